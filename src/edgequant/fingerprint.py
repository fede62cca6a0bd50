"""sha256 fingerprints of model files, remembered by (path, size, mtime) so a re-run is instant."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgequant.paths import cache_dir


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_dir() / "fingerprints.json"
    memo = _read_memo(memo_path)
    if key in memo:
        return memo[key]
    memo[key] = fresh_sha256(path)
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)
    return memo[key]


def fresh_sha256(path: Path) -> str:
    """The hash of the bytes there now, without the memo (what a verification must read)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One fingerprint for a set of files: names and contents, order independent."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


def _read_memo(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
