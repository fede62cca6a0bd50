"""A third-party backend, installed the way a plugin package is (a module plus a dist-info folder
declaring an `edgequant.backends` entry point), shows up in inspect, bench and the report with no
edit to edgequant. It lives only in a temporary folder on PYTHONPATH of the child processes, so
nothing stays registered after the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli

pytest.importorskip("torch", reason="its extra is not installed")

TOY_MODULE = '''
"""A toy format: the source's safetensors copied as they are, run by PyTorch."""
import shutil

from edgequant.backend import Backend
from edgequant.spec import Option, Precision


class ToyBackend(Backend):
    name = "toy"
    display_name = "Toy runtime"
    use_case = "tests of the plugin mechanism"
    extra = "toy"
    requires = ("torch",)
    precisions = {"copy": Precision("copy", 32, 32.0, "the source's weights, copied")}
    options = {"note": Option("note", str, "", "free text kept in the manifest")}

    def convert(self, source, spec, out_dir):
        for path in source.hf_dir.iterdir():
            if path.is_file():
                shutil.copyfile(path, out_dir / path.name)
        return {"model_file": "model.safetensors", "note": spec.options.get("note", "")}

    def open(self, artifact, *, n_ctx, need_logits, threads):
        from edgequant.backends.pytorch.runner import TorchRunner

        return TorchRunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, threads=threads)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("toy-plugin")
    (folder / "toy_backend.py").write_text(TOY_MODULE)
    dist = folder / "toy_backend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[edgequant.backends]\ntoy = toy_backend:ToyBackend\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def test_the_toy_is_not_registered_in_this_process():
    from edgequant.registry import format_names

    assert "toy" not in format_names()


def test_inspect_lists_the_plugin_format(tiny_model, plugin_env):
    result = run_cli("inspect", str(tiny_model), "--json", env=plugin_env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["estimated_bytes"]["toy:copy"] > 0


def test_bench_and_report_include_the_plugin_format(tiny_model, plugin_env, tmp_path):
    report = tmp_path / "report.json"
    result = run_cli("bench", str(tiny_model), "--to", "toy:copy?note=hello", "--db", str(tmp_path / "db.sqlite"),
                     "--json", str(report), "--windows", "1", "--ctx", "32", "--prompt-tokens", "8", "--gen-tokens", "4",
                     "--repeats", "1", env=plugin_env)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    row = next(r for r in data["rows"] if r["spec"] == "toy:copy?note=hello")
    # The same weights run the same way: only the float16 rounding of the cached reference remains.
    assert row["status"] == "ok" and abs(row["ppl_increase_pct"]) < 0.1
    assert any(s["framework"] == "Toy runtime" and s["use_case"] == "tests of the plugin mechanism" for s in data["summary"])
    artifact = json.loads((Path(row_artifact(tmp_path / "db.sqlite")) / "edgequant.json").read_text())
    assert artifact["details"]["note"] == "hello"


def test_a_misapplied_plugin_option_is_refused_like_any_other(tiny_model, plugin_env):
    result = run_cli("convert", str(tiny_model), "--to", "toy:copy?nope=1", env=plugin_env)
    assert result.returncode == 2 and "unknown option 'nope' for format 'toy'" in result.stderr


def row_artifact(db: Path) -> str:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT artifact_path FROM evaluations WHERE spec LIKE 'toy:%'").fetchone()[0]
