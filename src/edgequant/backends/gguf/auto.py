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
   Steps 1 and 2 do not depend on the budget; they are kept per source, importance matrix and
   held-out text, so another budget costs only step 3.
3. For a budget, a Lagrangian split picks each tensor's type (the best estimated KLD per byte),
   then the remaining bytes are spent greedily. That mix is quantized and measured for real, and
   so are its neighbours with flatter or sharper role weights (the weights raised to a power),
   walking in the direction that measures better; the best measured mix wins.

The budget counts the whole file. When even the cheapest type of every tensor does not fit, the
error names the smallest size reachable.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgequant.atomic import write_text_atomic
from edgequant.backends._shared.calibration import calibration_windows
from edgequant.backends.gguf import tools as gguf_tools
from edgequant.backends.gguf.collect import IMATRIX_TOKENS
from edgequant.backends.gguf.ggml import GGML_TYPES, LLAMA_FTYPE_MOSTLY_Q8_0
from edgequant.decisions.gates import parse_size
from edgequant.errors import EdgequantError
from edgequant.paths import cache_dir
from edgequant.progress import step
from edgequant.runner import default_threads

# The types tried for every tensor; duplicates after llama.cpp's fallbacks are dropped per tensor.
LADDER = ("q2_k", "q3_k", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
HELD_OUT_WINDOWS = 4  # 512-token windows of the calibration text after those the imatrix used
ROLE_WINDOWS = 2  # enough to rank roles, whose costs differ by orders of magnitude
WINDOW = 512
MAX_CANDIDATES = 4  # mixes quantized and measured end to end per budget


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


@dataclass
class Outcome:
    types: dict[str, str]
    size_bytes: int
    kld: float
    tried: list[dict] = field(default_factory=list)


def role(name: str) -> str:
    """blk.12.ffn_down.weight -> ffn_down; token_embd.weight -> token_embd."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def search(intermediate: Path, importance: dict, budget: int, scorer, quantize, workdir: Path,
           memo: Path | None = None) -> Outcome:
    """The measured-best mix within `budget` bytes. `quantize(path, types)` writes a GGUF with
    those per-tensor types; `scorer(path)` returns its KLD on the held-out windows. The ladder
    and the role weights do not depend on the budget: with `memo`, they are kept there and reused."""
    table, weights = _load_memo(memo)
    if table is None:
        table = candidate_table(intermediate, importance, quantize, workdir)
    if table.smallest() > budget:
        smallest = table.smallest()
        raise EdgequantError(
            f"no mix fits {budget:,} bytes: the smallest reachable is {smallest:,} bytes ({smallest / 1e6:.2f} MB, "
            f"every tensor at its cheapest type among {', '.join(LADDER)})",
            f"ask for at least size={math.ceil(smallest / 1e4) / 100:.2f}MB")
    if weights is None:
        weights = role_weights(table, scorer, quantize, workdir)
        _save_memo(memo, table, weights)
    tried: list[dict] = []

    def measure(exponent: float) -> Outcome:
        types = allocate(table, {r: w ** exponent for r, w in weights.items()}, budget)
        path = workdir / f"candidate-{exponent}.gguf"
        quantize(path, types)
        outcome = Outcome(types, path.stat().st_size, scorer(path) if path.stat().st_size <= budget else math.inf)
        tried.append({"role_weight_exponent": exponent, "size_bytes": outcome.size_bytes, "kld": outcome.kld})
        path.unlink()
        return outcome

    # Start from the measured role weights (exponent 1), then walk towards flatter or sharper
    # weights while the measured KLD improves: the proxy proposes, the measurement decides.
    best = measure(1.0)
    step = 0.5
    candidate = measure(step)
    if candidate.kld >= best.kld:
        step = 2.0
        candidate = measure(step)
    exponent = step
    while candidate.kld < best.kld and len(tried) < MAX_CANDIDATES:
        best = candidate
        exponent *= step
        candidate = measure(exponent)
    if candidate.kld < best.kld:
        best = candidate
    if math.isinf(best.kld):
        raise EdgequantError(f"no candidate stayed within {budget:,} bytes once written",
                             "ask for a slightly larger size; the file's metadata did not fit the estimate")
    best.tried = tried
    return best


def _load_memo(memo: Path | None) -> tuple[Table | None, dict | None]:
    if memo is None or not memo.is_file():
        return None, None
    saved = json.loads(memo.read_text())
    choices = {name: [Choice(*c) for c in found] for name, found in saved["choices"].items()}
    return Table(choices, saved["fixed_bytes"]), saved["weights"]


def _save_memo(memo: Path | None, table: Table, weights: dict) -> None:
    if memo is not None:
        choices = {name: [[c.type, c.nbytes, c.error] for c in found] for name, found in table.choices.items()}
        write_text_atomic(memo, json.dumps({"ladder": LADDER, "choices": choices, "fixed_bytes": table.fixed_bytes,
                                            "weights": weights}))


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
    base = scorer(path, windows=ROLE_WINDOWS)
    weights = {}
    for r in sorted({role(n) for n in table.choices}):
        members = [n for n in table.choices if role(n) == r]
        types = {**top, **{n: table.choices[n][0].type for n in members}}
        with step(f"auto: sensitivity of {r}"):
            quantize(path, types)
            added = max(scorer(path, windows=ROLE_WINDOWS) - base, 1e-9)
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
        from edgequant.measurement.logprobs import log_softmax

        self.windows, self.threads = windows, threads
        self.reference = [log_softmax(x) for x in self._logits(float_gguf)]
        self.calls, self.seconds = 0, 0.0

    def _logits(self, path: Path, windows: int | None = None) -> list[np.ndarray]:
        from edgequant.backends.gguf.runner import LlamaRunner

        runner = LlamaRunner(path, name=path.name, n_ctx=WINDOW, logits_all=True, threads=self.threads)
        try:
            return [runner.logits(ids) for ids in self.windows[:windows]]
        finally:
            runner.close()

    def __call__(self, path: Path, windows: int | None = None) -> float:
        """Mean KLD over the first `windows` held-out windows (None: all)."""
        from edgequant.measurement.logprobs import kl_divergence, log_softmax

        started = time.perf_counter()
        klds = [kl_divergence(ref, log_softmax(x)).mean() for ref, x in zip(self.reference, self._logits(path, windows))]
        self.calls += 1
        self.seconds += time.perf_counter() - started
        return float(np.mean(klds))


def build_mix(source, intermediate: Path, importance: dict, opt, target: Path) -> dict:
    """`gguf:auto`: search the per-tensor mix for the spec's budget, write the winner to `target`,
    and return what the manifest keeps of the search."""
    threads = opt.nthread or default_threads()
    n_elements = sum(t.numel for t in source.tensors)
    budget = parse_size(opt.size) if opt.size else int(opt.bpw * n_elements / 8)
    first = IMATRIX_TOKENS // WINDOW  # the imatrix's chunks come first; the held-out windows follow them
    windows = calibration_windows(source.hf_dir, first + HELD_OUT_WINDOWS, WINDOW)[first:]

    def quantize(path: Path, types: dict[str, str]) -> None:
        overrides = tuple((f"^{re.escape(name)}$", GGML_TYPES[t]) for name, t in types.items())
        gguf_tools.quantize(intermediate, path, gguf_tools.QuantizeRequest(
            LLAMA_FTYPE_MOSTLY_Q8_0, threads=threads, importance=importance, overrides=overrides))

    started = time.perf_counter()
    scorer = HeldOutScorer(intermediate, windows, threads)
    memo = cache_dir("intermediates") / f"{source.fingerprint[:16]}-auto-{_importance_key(importance)}.json"
    with tempfile.TemporaryDirectory(prefix="edgequant-auto-") as scratch:
        outcome = search(intermediate, importance, budget, scorer, quantize, Path(scratch), memo)
    quantize(target, outcome.types)
    return {"budget_bytes": budget, "size_bytes": target.stat().st_size, "held_out_kld": round(outcome.kld, 6),
            "held_out": {"text": "calibration text", "first_token": first * WINDOW,
                         "windows": HELD_OUT_WINDOWS, "window": WINDOW},
            "candidates": outcome.tried, "measurements": scorer.calls, "search_s": round(time.perf_counter() - started, 1)}


def _importance_key(importance: dict) -> str:
    """A short fingerprint of importance weights (what the auto search's memo depends on)."""
    digest = hashlib.sha256()
    for name in sorted(importance):
        digest.update(name.encode() + importance[name].tobytes())
    return digest.hexdigest()[:16]
