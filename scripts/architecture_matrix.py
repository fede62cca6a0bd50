"""Regenerate docs/models.md's architecture x format table from the architecture tests' own results.

Runs tests/test_architectures.py with EDGEQUANT_MATRIX_OUT set, keeps the JSON it writes in
bench/results/architectures.json, and replaces the table between docs/models.md's markers. Usage:
    .venv/bin/python scripts/architecture_matrix.py [--render-only]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "architectures.json"
BEGIN, END = "<!-- architecture-matrix:begin -->", "<!-- architecture-matrix:end -->"
FORMATS = ("gguf", "onnx", "openvino", "mlx", "qnn")


def cell(facts: dict | None) -> str:
    if not facts:
        return "not run"
    status = facts.get("status", "ok")
    if status in ("refused", "fails"):
        reason = re.sub(r"\s/\S+", "", facts["reason"].splitlines()[0])  # no temporary paths in the docs
        return f"{status}: {reason[:100]}"
    parts = []
    if status == "limited":  # a float spec checked within the window, or a quantized-only format's recorded limitation
        parts.append("exact within its sliding window only" if "float_ctx" in facts else "sliding window not applied (recorded)")
    if "float_kld" in facts:
        parts.append(f"float KLD {facts['float_kld']:.1e}")
    if "quant_kld" in facts:
        parts.append(f"{facts['quant_spec'].split(':', 1)[1].split('?')[0]} KLD {facts['quant_kld']:.3f}")
    return f"{status}: " + ", ".join(parts)


def table(results: dict) -> str:
    lines = ["| architecture | " + " | ".join(FORMATS) + " |", "|---|" + "---|" * len(FORMATS)]
    for arch in sorted(results):
        lines.append(f"| {arch} | " + " | ".join(cell(results[arch].get(f)) for f in FORMATS) + " |")
    return "\n".join(lines)


def main() -> int:
    returncode = 0
    if "--render-only" not in sys.argv:  # --render-only: rewrite the table from the last results
        env = {**os.environ, "EDGEQUANT_MATRIX_OUT": str(RESULTS)}
        returncode = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_architectures.py"], cwd=REPO, env=env).returncode
    results = json.loads(RESULTS.read_text())
    readme = (REPO / "docs" / "models.md").read_text()
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    (REPO / "docs" / "models.md").write_text(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")
    return returncode


if __name__ == "__main__":
    raise SystemExit(main())
