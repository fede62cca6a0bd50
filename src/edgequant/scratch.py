"""A command's temporary files, and what killed commands left behind.

Each command puts its temporary files, and those of the engines and child processes it starts, in
one folder of the cache named by its process (`tmp/.run.tmp-PID-...`, through TMPDIR), removed when
it exits. A command killed with SIGKILL cannot remove anything, so every command first sweeps the
cache for temporary files and folders whose process is gone (`atomic.sweep_leftovers`): whatever a
crash leaves is gone by the next run, in /tmp as well as beside artifacts.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from edgequant.atomic import sweep_leftovers
from edgequant.paths import cache_dir, cache_home

_SWEEP_DEPTH = 2  # artifacts/<fingerprint>/ holds the deepest temporary folders (.q8_0.tmp-PID-...)


def begin_command() -> Path | None:
    """Sweep the cache, then send this process's temporary files to a folder of its own. Returns
    the folder, or None when the cache cannot be written (the command says why when it needs it)."""
    try:
        sweep_cache()
        folder = Path(tempfile.mkdtemp(prefix=f".run.tmp-{os.getpid()}-", dir=cache_dir("tmp")))
    except OSError:
        return None
    os.environ["TMPDIR"] = str(folder)  # child processes: the engines' converters, speed probes
    tempfile.tempdir = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def sweep_cache() -> list[Path]:
    """Remove what dead processes left anywhere in the cache's top levels."""
    home = cache_home()
    if not home.is_dir():
        return []
    removed, level = [], [home]
    for _ in range(_SWEEP_DEPTH + 1):
        below = []
        for folder in level:
            removed += sweep_leftovers(folder)
            below += [p for p in _subfolders(folder) if not p.name.startswith(".")]
        level = below
    return removed


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
