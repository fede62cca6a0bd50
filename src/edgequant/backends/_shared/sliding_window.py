"""The one limitation several engines share: a model trained with a sliding attention window run
with full attention. Outputs then match the source exactly while the context fits the window and
drift beyond it, so the limitation names the window and evaluations can stay inside it.
"""

from __future__ import annotations


def sliding_window(config: dict) -> int | None:
    """The model's attention window in tokens, or None when it attends over the whole context."""
    window = config.get("sliding_window")
    if not window or not config.get("use_sliding_window", True):
        return None
    return int(window)


def window_ignored(config: dict, how: str) -> list[str]:
    """The limitation text for an engine that runs `config`'s model with full attention (`how`
    says in what way), or nothing when the model has no sliding window."""
    window = sliding_window(config)
    if window is None:
        return []
    return [f"{how}, without the model's {window}-token sliding window: logits match the source only "
            f"while the context is at most {window} tokens"]
