"""`gguf:auto`: per-tensor types chosen for a size budget, and checked by measurement.

1. Every weight matrix is quantized at each type of a ladder (one llama.cpp pass per type, with the
   importance matrix); each tensor's stored type, byte size and imatrix-weighted squared error
   against the float weights are read back. Rows whose width is not a multiple of 256 cannot take
   K-quants: llama.cpp's fallback type is what such a tensor really gets, so it is what we record.
2. How much a unit of that error costs in output quality differs by the tensor's role (a value
   projection is not an up projection): for each role, one file with only that role at its
   cheapest type (everything else at 8 bit) is scored for KL divergence against the float model
   on held-out calibration windows (never the evaluation windows), which turns the proxy into an
   estimate of KLD per role.
3. For a budget, a Lagrangian split picks each tensor's type (the best estimated KLD per byte),
   then the remaining bytes are spent greedily. A few variants of the estimate (sharper and
   flatter role weights) are built, quantized and measured for real; the best measured one wins.

The budget counts the whole file. When even the cheapest type of every tensor does not fit, the
error names the smallest size reachable.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.progress import step

# The types tried for every tensor; duplicates after llama.cpp's fallbacks are dropped per tensor.
LADDER = ("q2_k", "q3_k", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
TOP = "q8_0"
HELD_OUT_WINDOWS = 4  # 512-token windows from the end of the calibration text (the imatrix uses its start)
WINDOW = 512
SHARPNESS = (1.0, 0.5, 2.0)  # exponents on the measured role weights: the candidates measured end to end


@dataclass(frozen=True)
class Choice:
    type: str
    nbytes: int
    error: float  # sum over rows and columns of importance x squared rounding error


@dataclass
class Table:
    """Per tensor, its choices from cheapest to dearest; plus the bytes no choice changes."""

    choices: dict[str, list[Choice]]
    fixed_bytes: int

    def smallest(self) -> int:
        return self.fixed_bytes + sum(c[0].nbytes for c in self.choices.values())

    def largest(self) -> int:
        return self.fixed_bytes + sum(c[-1].nbytes for c in self.choices.values())


@dataclass
class Outcome:
    types: dict[str, str]
    size_bytes: int
    kld: float
    tried: list[dict] = field(default_factory=list)


def role(name: str) -> str:
    """blk.12.ffn_down.weight -> ffn_down; token_embd.weight -> token_embd."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def parse_size(text: str) -> int:
    """`120MB`, `1.5GiB`, `900KB` or a byte count, in bytes (MB = 10^6, MiB = 2^20)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise EdgequantError(f"size={text!r} is not a size", "write e.g. size=120MB, size=0.5GiB or a byte count")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def search(intermediate: Path, importance: dict, budget: int, scorer, quantize, workdir: Path) -> Outcome:
    """The measured-best mix within `budget` bytes. `quantize(path, types)` writes a GGUF with
    those per-tensor types; `scorer(path)` returns its KLD on the held-out windows."""
    table = candidate_table(intermediate, importance, quantize, workdir)
    if table.smallest() > budget:
        smallest = table.smallest()
        raise EdgequantError(
            f"no mix fits {budget:,} bytes: the smallest reachable is {smallest:,} bytes ({smallest / 1e6:.2f} MB, "
            f"every tensor at its cheapest type among {', '.join(LADDER)})",
            f"ask for at least size={math.ceil(smallest / 1e4) / 100:.2f}MB")
    weights = role_weights(table, scorer, quantize, workdir)
    tried, best = [], None
    for sharpness in SHARPNESS:
        types = allocate(table, {r: w ** sharpness for r, w in weights.items()}, budget)
        path = workdir / f"candidate-{sharpness}.gguf"
        quantize(path, types)
        entry = {"role_weight_exponent": sharpness, "size_bytes": path.stat().st_size, "kld": scorer(path)}
        tried.append(entry)
        if entry["size_bytes"] <= budget and (best is None or entry["kld"] < best.kld):
            best = Outcome(types, entry["size_bytes"], entry["kld"])
        path.unlink()
    if best is None:
        raise EdgequantError(f"no candidate stayed within {budget / 1e6:.1f} MB once written",
                             "ask for a slightly larger size; the file's metadata did not fit the estimate")
    best.tried = tried
    return best


def candidate_table(intermediate: Path, importance: dict, quantize, workdir: Path) -> Table:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    floats = {t.name: t for t in GGUFReader(intermediate).tensors if len(t.shape) == 2}
    options: dict[str, dict[str, Choice]] = {name: {} for name in floats}
    fixed = None
    for qtype in LADDER:
        path = workdir / f"ladder-{qtype}.gguf"
        with step(f"auto: every tensor at {qtype}"):
            quantize(path, dict.fromkeys(floats, qtype))
            reader = GGUFReader(path)
            for t in reader.tensors:
                if t.name not in floats:
                    continue
                stored = t.tensor_type.name.lower()
                if stored in options[t.name]:
                    continue  # llama.cpp fell back to a type already measured
                w = np.asarray(floats[t.name].data, dtype=np.float32)
                w_hat = dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
                weight = importance.get(t.name)
                weight = np.ones(w.shape[-1], np.float32) if weight is None else weight[: w.shape[-1]]
                options[t.name][stored] = Choice(stored, int(t.n_bytes), float((((w - w_hat) ** 2) * weight).sum()))
            if fixed is None:
                fixed = path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors if t.name in floats)
        path.unlink()
    choices = {}
    for name, found in options.items():  # keep only the choices no cheaper one beats on error
        ordered = sorted(found.values(), key=lambda c: (c.nbytes, c.error))
        frontier = [c for i, c in enumerate(ordered) if all(c.error < o.error for o in ordered[:i])]
        choices[name] = frontier
    return Table(choices, fixed)


def role_weights(table: Table, scorer, quantize, workdir: Path) -> dict[str, float]:
    """KLD per unit of proxy error for each role, measured with that role alone at its cheapest type."""
    top = {name: c[-1].type for name, c in table.choices.items()}
    path = workdir / "roles-top.gguf"
    quantize(path, top)
    base = scorer(path)
    weights = {}
    for r in sorted({role(n) for n in table.choices}):
        members = [n for n in table.choices if role(n) == r]
        types = {**top, **{n: table.choices[n][0].type for n in members}}
        with step(f"auto: sensitivity of {r}"):
            quantize(path, types)
            added = max(scorer(path) - base, 1e-9)
        proxy = sum(table.choices[n][0].error - table.choices[n][-1].error for n in members)
        weights[r] = added / proxy if proxy > 0 else 0.0
    path.unlink()
    return weights


def allocate(table: Table, weights: dict[str, float], budget: int) -> dict[str, str]:
    """Each tensor's type minimising estimated KLD (weight x proxy error) within `budget` bytes."""
    room = budget - table.fixed_bytes

    def pick(lam: float) -> dict[str, int]:
        return {n: min(range(len(c)), key=lambda i: weights[role(n)] * c[i].error + lam * c[i].nbytes)
                for n, c in table.choices.items()}

    def size(picked: dict[str, int]) -> int:
        return sum(table.choices[n][i].nbytes for n, i in picked.items())

    low, high = 0.0, 1.0
    while size(pick(high)) > room:  # a price per byte high enough to fit
        high *= 4
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if size(pick(mid)) > room else (low, mid)
    picked = pick(high)
    spare = room - size(picked)
    while True:  # spend what is left on the upgrades that buy the most per byte
        best, best_gain = None, 0.0
        for n, i in picked.items():
            c = table.choices[n]
            if i + 1 < len(c) and c[i + 1].nbytes - c[i].nbytes <= spare:
                gain = weights[role(n)] * (c[i].error - c[i + 1].error) / max(c[i + 1].nbytes - c[i].nbytes, 1)
                if gain > best_gain:
                    best, best_gain = n, gain
        if best is None:
            break
        spare -= table.choices[best][picked[best] + 1].nbytes - table.choices[best][picked[best]].nbytes
        picked[best] += 1
    return {n: table.choices[n][i].type for n, i in picked.items()}


class HeldOutScorer:
    """KL divergence of a GGUF to the float GGUF on calibration windows the importance matrix
    did not see, both run by llama.cpp (the float reference is computed once)."""

    def __init__(self, float_gguf: Path, windows: list[list[int]], threads: int):
        from edgequant.logprobs import log_softmax

        self.windows, self.threads = windows, threads
        self.reference = [log_softmax(x) for x in self._logits(float_gguf)]
        self.calls, self.seconds = 0, 0.0

    def _logits(self, path: Path) -> list[np.ndarray]:
        from edgequant.backends.gguf.runner import LlamaRunner

        runner = LlamaRunner(path, name=path.name, n_ctx=WINDOW, logits_all=True, threads=self.threads)
        try:
            return [runner.logits(ids) for ids in self.windows]
        finally:
            runner.close()

    def __call__(self, path: Path) -> float:
        from edgequant.logprobs import kl_divergence, log_softmax

        started = time.perf_counter()
        klds = [kl_divergence(ref, log_softmax(x)).mean() for ref, x in zip(self.reference, self._logits(path))]
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return float(np.mean(klds))


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="edgequant-auto-")
