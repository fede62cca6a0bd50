"""The adapter of a batch decoder whose engine computes every sequence of a step with one LoRA
adapter (ONNX's bound inputs, MLX's wrapped layers, OpenVINO's LoRA states): it changes only while
no sequence runs, which the server's scheduler ensures for decoders that do not mix adapters."""

from __future__ import annotations

from typing import Callable


class AdapterSwitch:
    """Which adapter (a served name; None: the runner's own) the engine computes with, and the one
    place that changes it: `apply(name)` runs once per change, never while sequences run."""

    def __init__(self, apply: Callable[[str | None], None]):
        self._apply, self.name = apply, None

    def select(self, name: str | None, running: bool) -> None:
        if name == self.name:
            return
        if running:
            raise ValueError(f"adapter {name!r} requested while sequences of {self.name!r} run")
        self._apply(name)
        self.name = name
