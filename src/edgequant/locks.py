"""One process at a time per cached result: two edgequant runs on one cache never build the same
artifact, intermediate or reference twice.

A lock is `flock` on a small file in the cache's `locks/` folder, named by the hash of the result's
absolute path (never a stray file in a user's output folder). The kernel releases it when its
holder exits, however it exits (SIGKILL included), so a lock can never outlive its process: a
"stale" lock is simply one nobody holds. The file also says who holds it (pid and command), so a
run that must wait says for whom. Callers check for the finished result again once they hold the
lock: whoever waited usually finds it built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edgequant.paths import cache_dir
from edgequant.progress import note


@contextmanager
def building(target: Path, what: str) -> Iterator[None]:
    """Hold the lock of `target` (a file or folder not yet built) while the block runs."""
    name = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:24]
    path = cache_dir("locks") / f"{name}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"waiting: {_holder(path)} is {what}; this run goes on when it is done")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:4])}))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, done: Path, what: str, build: Callable[[], None]) -> None:
    """Run `build` unless `done` (the file that marks `target` finished) exists, holding `target`'s
    lock, and look for `done` again once the lock is held: a process that waited usually finds it."""
    if done.exists():
        return
    with building(target, what):
        if not done.exists():
            build()


def _holder(path: Path) -> str:
    try:
        found = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        found = {}
    return f"process {found['pid']} ({found.get('command', '?')})" if "pid" in found else "another edgequant process"
