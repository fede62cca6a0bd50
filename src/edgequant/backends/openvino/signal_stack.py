"""Keep OpenVINO from leaving a thread with a freed alternate signal stack.

Loading OpenVINO's CPU plugin gives the calling thread an alternate signal stack (`sigaltstack`)
of the plugin's own. When OpenVINO GenAI unloads the plugin (a pipeline's destructor releases
it), that memory is freed, but a thread can still point at it. Python runs its signal handlers
on the alternate stack (SA_ONSTACK), so the next signal that thread handles crashes with SIGSEGV:
the server's main thread did, re-raising SIGTERM after its graceful shutdown, once a batched
OpenVINO model had been served (openvino 2026.4.1, 2026-12-06). Around every call that may load
or unload the plugin, the calling thread's signal stack is put back as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys


class _Stack(ctypes.Structure):  # stack_t on Linux and macOS
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def kept_signal_stack():
    """Run the block, then give the calling thread back the alternate signal stack it had before."""
    if sys.platform == "win32":  # no sigaltstack
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _Stack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)
