"""Command line: argv is parsed by the verb's own module (`edgequant.commands`), whose `run` makes
one call of the Python API. A verb imports what it needs when it runs, so `edgequant --help`
stays instant. `EdgequantError` becomes a two-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from importlib import import_module

from edgequant.commands import VERBS
from edgequant.errors import DISK_FULL_FIX, EdgequantError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgequant", description="Convert, quantize, evaluate and serve models for edge devices.")
    parser.add_argument("--version", action="version", version=f"edgequant {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        import_module(f"edgequant.commands.{verb}").add(sub)
    return parser


def _version() -> str:
    from edgequant import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from edgequant.scratch import begin_command

    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGTERM, _terminated)  # `kill PID` cleans up as Ctrl-C does
    try:
        begin_command()
        return args.run(args)
    except EdgequantError as exc:
        print(f"edgequant: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgequant: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("edgequant: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours; before OSError, its base
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"edgequant: error: the disk is full{where}\n  fix: {DISK_FULL_FIX}", file=sys.stderr)
            return 2
        if os.environ.get("EDGEQUANT_DEBUG"):
            raise
        log = _crash_log(args)  # not a user's mistake: a bug of ours or an engine's
        print(f"edgequant: error: `{args.command}` stopped on an unexpected {type(exc).__name__} inside edgequant or an "
              "engine it runs: a bug, not a problem with what you asked", file=sys.stderr)
        print(f"  fix: report it with {log}, which holds the traceback (EDGEQUANT_DEBUG=1 prints it here)", file=sys.stderr)
        return 70  # EX_SOFTWARE


def _crash_log(args) -> str:
    """Write the traceback being handled, with the command and versions, to the cache's logs;
    returns where, or says it could not."""
    import time
    import traceback

    from edgequant.paths import cache_dir

    try:
        path = cache_dir("logs") / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"edgequant {_version()}, Python {sys.version.split()[0]}\ncommand: {' '.join(sys.argv)}\n\n"
                        + traceback.format_exc())
    except OSError:
        traceback.print_exc()
        return "the traceback above"
    return str(path)


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so every `finally` (temporary folders, locks) runs."""


def _terminated(signum, frame) -> None:
    raise _Terminated()
