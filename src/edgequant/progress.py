"""Progress on stderr: named steps with elapsed time, so long operations never look hung."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _quiet() -> bool:
    return os.environ.get("EDGEQUANT_QUIET") == "1"


def note(message: str) -> None:
    if not _quiet():
        print(f"edgequant: {message}", file=sys.stderr, flush=True)


@contextmanager
def step(message: str) -> Iterator[None]:
    start = time.perf_counter()
    note(f"{message} ...")
    yield
    note(f"{message}: done in {time.perf_counter() - start:.1f}s")


class Stopwatch:
    """The steps of one long job, each announced as `step` does, and their seconds kept by name
    (a manifest records them, so the cost of each step is measured wherever the job ran)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, message: str) -> Iterator[None]:
        start = time.perf_counter()
        with step(message):
            yield
        self.seconds[f"{name}_s"] = round(time.perf_counter() - start, 3)


@contextmanager
def engine_warnings_hidden() -> Iterator[None]:
    """Hide an engine's advice meant for its own users (onnxruntime.quantization logs "consider
    pre-processing" and opset upgrades on the root logger); errors still show."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar for loops longer than a few seconds (silent when quiet or not a terminal)."""
    from tqdm import tqdm

    disable = _quiet() or not sys.stderr.isatty()
    yield from tqdm(items, desc=f"edgequant: {description}", total=total, disable=disable, leave=False)
