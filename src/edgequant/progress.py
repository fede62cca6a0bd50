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


# How often a loop writes a progress line where stderr is not a terminal (a log, CI, a pipe).
LOG_EVERY_S = 30.0


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Progress of a loop longer than a few seconds, with an estimate of the time left. On a
    terminal, a bar; elsewhere (a log file, CI) one line every LOG_EVERY_S seconds, so a long
    step in a log never looks hung. Silent when quiet."""
    if _quiet():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=f"edgequant: {description}", total=total, leave=False)
        return
    started = last = time.perf_counter()
    for done, item in enumerate(items):
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S:
            last = now
            note(progress_line(description, done, total, now - started))
        yield item


def progress_line(description: str, done: int, total: int | None, elapsed: float) -> str:
    """'scoring: 12/64 after 1m 30s, about 6m 30s left' (the rate so far, carried forward)."""
    line = f"{description}: {done}/{total if total else '?'} after {_duration(elapsed)}"
    if total and done:
        line += f", about {_duration(elapsed / done * (total - done))} left"
    return line


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def engine_stdout_to_stderr():
    """Send an engine's own prints and progress bars (NNCF draws them on stdout) to stderr, beside
    ours: stdout carries only the command's result (`--json` output must parse)."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)
