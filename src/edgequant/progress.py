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


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar for loops longer than a few seconds (silent when quiet or not a terminal)."""
    from tqdm import tqdm

    disable = _quiet() or not sys.stderr.isatty()
    yield from tqdm(items, desc=f"edgequant: {description}", total=total, disable=disable, leave=False)
