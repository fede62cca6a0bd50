"""Atomic writes: build in a temporary sibling, rename into place, never leave half a result.

Every temporary name says which process made it (`.NAME.tmp-PID-...`, and `.NAME.old-PID` for a
replaced folder on its way out), so whatever a killed process left is recognised later and
removed by `sweep_leftovers` once that process is gone, by the next run that looks there.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgequant.errors import EdgequantError


def ensure_writable_parent(target: Path, folder: bool = True) -> None:
    """Fail early, with a fix, when `target` (a folder, or a file when `folder` is false) cannot be created."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgequantError(f"cannot create folder {parent} ({exc.strerror})", "choose an output path you can write to") from None
    try:  # a real probe: os.access says yes to root even where the file system says no
        os.rmdir(tempfile.mkdtemp(prefix=".edgequant-probe-", dir=parent))
    except OSError as exc:
        raise EdgequantError(f"cannot write to {parent} ({exc.strerror})", "choose an output path you can write to (-o PATH)") from None
    if folder and target.exists() and not target.is_dir():
        raise EdgequantError(f"{target} exists and is not a folder", "remove it or choose another output path")
    if not folder and target.is_dir():
        raise EdgequantError(f"{target} is a folder", "give a file name for the report")


@contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `target` only if the block finishes without error."""
    ensure_writable_parent(target)
    sweep_leftovers(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
    try:
        yield tmp
        _move_into_place(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, target: Path, replace: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not replace:
        raise EdgequantError(f"{target} already exists", "pass --force to rebuild it, or choose another output path")
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, trash)
    os.rename(tmp, target)
    shutil.rmtree(trash, ignore_errors=True)


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path` for writing it before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# `.NAME.tmp-PID-...` (a file or folder being written) or `.NAME.old-PID` (a replaced folder)
LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(?:[-.].*)?$")


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` whose process has died (killed before it
    could rename or remove them); those of live processes are theirs. Returns what was removed."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = LEFTOVER.match(entry.name)
        if not found or _alive(int(found.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
