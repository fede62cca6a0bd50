"""Child processes that end with the command that started them.

A converter, builder or speed probe runs in a child process; when its parent is killed (SIGKILL,
the OOM killer) a child would go on for minutes, holding gigabytes and writing into a temporary
folder nobody will rename. On Linux the kernel sends the child SIGKILL when its parent dies
(`PR_SET_PDEATHSIG`); elsewhere children outlive a killed parent as they always did.
"""

from __future__ import annotations

import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_SIGKILL = 9


def _death_signal():
    """The function a forked child runs before exec, or None where the kernel has no such call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the forked child only calls it
    return lambda: prctl(_PR_SET_PDEATHSIG, _SIGKILL)


def run(command: list[str], **options) -> subprocess.CompletedProcess:
    """`subprocess.run` of a child that dies with this process."""
    return subprocess.run(command, preexec_fn=_death_signal(), **options)
