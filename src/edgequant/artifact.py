"""Artifacts: a folder with the model files and `edgequant.json`, the manifest describing them.

The manifest records what was asked (spec), from what (source fingerprint), with which tools, how
long it took and how big it is. An artifact is never written again once its conversion renamed it
into place: its evaluations live in the results store, keyed by `content_sha256` and settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.spec import Spec

MANIFEST = "edgequant.json"
SCHEMA_VERSION = 1


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def spec(self) -> Spec:
        s = self.manifest["spec"]
        return Spec(s["format"], s["precision"], dict(s.get("options", {})))

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model_file"]

    @property
    def adapter_path(self) -> Path | None:
        """The LoRA adapter file a `?lora=separate` artifact's runtime applies (the manifest's
        details.adapter), or None."""
        adapter = (self.manifest.get("details") or {}).get("adapter")
        return self.path / adapter["file"] if adapter else None

    @property
    def source_fingerprint(self) -> str:
        return self.manifest["source"]["fingerprint"]

    @property
    def task(self) -> str:
        """What the model does; artifacts written before tasks existed are causal LMs."""
        return self.manifest["source"].get("task", "text-generation")

    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size_bytes"])

    @functools.cached_property
    def content_sha256(self) -> str:
        """One hash of every file's path in the folder and its bytes, taken once per opened
        artifact (it is never written again; each file's hash is also remembered by path, size
        and mtime, so another process gets it without reading the bytes)."""
        from edgequant.fingerprint import sha256_of_files

        hashes = sha256_of_files(sorted(p for p in self.path.rglob("*") if p.is_file()))
        digest = hashlib.sha256()
        for path, sha in hashes.items():
            digest.update(f"{path.relative_to(self.path).as_posix()}\0{sha}\n".encode())
        return digest.hexdigest()


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_artifact(path: str | Path) -> Artifact:
    path = Path(path).expanduser().resolve()
    if not is_artifact(path):
        raise EdgequantError(f"{path} is not an edgequant artifact (no {MANIFEST})", "pass a folder written by `edgequant convert`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as exc:
        raise EdgequantError(f"{path / MANIFEST} is corrupt ({exc})", "re-create the artifact with `edgequant convert --force`") from None
    if manifest.get("schema") != SCHEMA_VERSION:
        raise EdgequantError(f"{path} was written by an incompatible edgequant", "re-create it with `edgequant convert --force`")
    artifact = Artifact(path, manifest)
    if not artifact.model_path.is_file():
        raise EdgequantError(f"{path} is missing its model file {artifact.model_path.name}", "re-create it with --force")
    return artifact


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
