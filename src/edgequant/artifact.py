"""Artifacts: a folder with the model files and `edgequant.json`, the manifest describing them.

The manifest records what was asked (spec), from what (source fingerprint), with which tools, how
long it took, how big it is, and — once evaluated — the metrics, so an artifact describes itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgequant.atomic import write_text_atomic
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
    def source_fingerprint(self) -> str:
        return self.manifest["source"]["fingerprint"]

    @property
    def size_bytes(self) -> int:
        return int(self.manifest["size_bytes"])

    def save_evaluation(self, metrics: dict) -> str:
        """Store an evaluation's metrics under the key of its settings (text, windows, context,
        speed settings, baseline): one made with other settings keeps its own entry. Returns the key."""
        key = evaluation_key(metrics)
        self.manifest.setdefault("evaluations", {})[key] = metrics
        self.manifest.pop("metrics", None)  # the single slot of older manifests
        write_text_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=2))
        return key


def evaluation_key(metrics: dict) -> str:
    """`<windows>x<ctx>-<hash of every setting and the baseline>`, readable and unique per setting."""
    import hashlib

    settings = metrics["settings"]
    identity = json.dumps({**settings, "baseline": metrics["baseline"]}, sort_keys=True, default=str)
    return f"{settings['windows']}x{settings['ctx']}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


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
