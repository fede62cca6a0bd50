"""sha256 fingerprints of model files, remembered by (path, size, mtime) so a re-run is instant."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgequant.atomic import write_text_atomic
from edgequant.paths import cache_dir


def file_sha256(path: Path) -> str:
    return sha256_of_files([path])[path]


def sha256_of_files(paths: list[Path]) -> dict[Path, str]:
    """Each file's sha256, the memo read once and written once for the whole set (an artifact
    folder holds many files; reading and rewriting the memo per file grew with every artifact)."""
    memo_path = cache_dir() / "fingerprints.json"
    memo = _read_memo(memo_path)
    found, added = {}, False
    for path in paths:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key], added = fresh_sha256(path), True
        found[path] = memo[key]
    if added:
        write_text_atomic(memo_path, json.dumps(memo))
    return found


def fresh_sha256(path: Path) -> str:
    """The hash of the bytes there now, without the memo (what a verification must read)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One fingerprint for a set of files: names and contents, order independent."""
    digest, hashes = hashlib.sha256(), sha256_of_files(paths)
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + hashes[path].encode())
    return digest.hexdigest()


def _read_memo(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
