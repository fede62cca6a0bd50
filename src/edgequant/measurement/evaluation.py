"""One evaluation harness for every format: quality on identical token windows, then speed.

Quality: the source model's tokenizer turns the evaluation text into ids once; every runner gets
the same windows of ids. The PyTorch baseline's log-probabilities are computed once per
(source, windows) and cached, so perplexity, KL divergence and top-1 agreement of any artifact are
relative to the same reference. Speed and peak memory come from a child process (see
`edgequant.measurement.speed_probe`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgequant.atomic import temp_sibling, write_text_atomic
from edgequant.errors import EdgequantError
from edgequant.locks import build_once
from edgequant.measurement.intervals import TokenScores, bootstrap
from edgequant.measurement.intervals import method as interval_method
from edgequant.measurement.logprobs import first_difference, kl_divergence, log_softmax
from edgequant.measurement.settings import EvalConfig
from edgequant.measurement.task_evaluation import evaluate_task, task_inputs_identity
from edgequant.paths import cache_dir
from edgequant.progress import note, step, track
from edgequant.registry import BASELINE_SPEC, open_runner
from edgequant.sources.tasks import TEXT_GENERATION

_TOKENIZER_CHECK_CHARS = 4000


@dataclass
class Target:
    """What is evaluated: an artifact, or a source model run by PyTorch (the baseline itself)."""

    path: Path | None
    artifact: object | None = None
    size_bytes: int = 0
    label: str = ""


@dataclass
class Windows:
    ids: np.ndarray  # (windows, ctx) int64
    text_sha256: str
    data_name: str
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Names the reference cache: the same ids cut into other window shapes are other windows."""
        shape = "x".join(str(n) for n in self.ids.shape).encode()
        return hashlib.sha256(shape + b":" + self.ids.tobytes()).hexdigest()[:16]


def evaluate(target: str | Path | None = None, baseline: str | Path | None = None, config: EvalConfig | None = None,
             reuse: bool = False, record: bool = True) -> dict:
    """Evaluate an artifact (or a source model) against its baseline; returns the metrics. With
    `reuse`, an evaluation of the same artifact bytes with the same settings, text and baseline,
    found in the results store, is returned as it is (its "cached" key says so) instead of being
    measured again. With `record` false the results store is not touched (a Ray worker's
    evaluation: the driver records it with `record_evaluation`)."""
    return _evaluate(target, baseline, config, reuse, record)[0]


def evaluate_with_scores(target: str | Path | None = None, baseline: str | Path | None = None,
                         config: EvalConfig | None = None) -> tuple[dict, TokenScores]:
    """`evaluate`, measured now, plus the per-token scores behind its quality figures: what paired
    comparisons of two artifacts on the same tokens need (bench/imatrix.py's ratio intervals)."""
    return _evaluate(target, baseline, config, reuse=False)


def _evaluate(target, baseline, config: EvalConfig | None, reuse: bool, record: bool = True) -> tuple[dict, TokenScores | None]:
    from edgequant.runner import default_threads
    from edgequant.sources.source import load_source

    config = config or EvalConfig()
    threads = config.threads or default_threads()
    resolved = _resolve_target(target)
    source = load_source(baseline if baseline is not None else _recorded_source(resolved))
    text, data_name = _inputs_of(source, config)
    settings = _settings(config, threads, text, data_name)
    found = _stored(resolved, source, settings) if reuse else None
    if found is not None:
        note(f"cached evaluation: {resolved.label} was measured with these settings, text and baseline before")
        return {**found, "cached": True}, None
    if source.task != TEXT_GENERATION:
        return _finish(resolved, evaluate_task(resolved, source, config, threads), settings, record), None
    windows = _make_windows(source, config, text, data_name)
    reference = _reference_logprobs(source, windows, threads)
    scores, arithmetic = _quality(resolved, source, windows, reference, threads)
    metrics = {"target": resolved.label, "baseline": str(source.path), **quality_figures(scores),
               **({"arithmetic": arithmetic} if arithmetic else {}), "size_bytes": resolved.size_bytes}
    if source.adaptation:  # a fine-tuned model: did the adaptation survive conversion?
        from edgequant.adaptation.scoring import finetune_figures

        metrics.update(finetune_figures(source, resolved.path, threads))
    if source.is_default_model:  # its quality figures always travel with why they flatter low bits
        from edgequant.sources.source import DEFAULT_MODEL_CAVEAT

        metrics["caveat"] = DEFAULT_MODEL_CAVEAT
    if config.speed:
        prompts = _speed_prompts(windows, min(config.prompt_tokens, config.ctx), config.repeats + 1)
        from edgequant.measurement.speed_probe import SpeedRequest, run_in_child

        with step(f"measuring speed and peak memory of {resolved.label} in a child process"):
            request = SpeedRequest(str(resolved.path) if resolved.path else None, prompts, config.gen_tokens,
                                   config.repeats, threads, config.prompt_tokens + config.gen_tokens + 8)
            metrics.update(run_in_child(request))
    return _finish(resolved, metrics, settings, record), scores


def _finish(resolved: Target, metrics: dict, settings: dict, record: bool = True) -> dict:
    """The settings and machine added to the figures, and an artifact's evaluation stored."""
    metrics["settings"] = settings
    metrics["machine"] = machine_info()
    if resolved.artifact is not None:
        metrics["evaluation_key"] = _store(resolved.artifact, metrics) if record else evaluation_key(metrics)
    return metrics


def record_evaluation(artifact: str | Path, metrics: dict) -> str:
    """Store an evaluation of the artifact at `artifact` made elsewhere (`evaluate(record=False)`
    in a Ray worker), as `evaluate` would have; returns the settings' key."""
    from edgequant.artifact import open_artifact

    return _store(open_artifact(artifact), metrics)


def stored_evaluation(target: str | Path, config: EvalConfig) -> dict | None:
    """The stored evaluation of the artifact's bytes with these settings, text and baseline, if any."""
    from edgequant.runner import default_threads
    from edgequant.sources.source import load_source

    resolved = _resolve_target(target)
    if resolved.artifact is None:
        return None
    source = load_source(_recorded_source(resolved))
    text, data_name = _inputs_of(source, config)
    return _stored(resolved, source, _settings(config, config.threads or default_threads(), text, data_name))


def _settings(config: EvalConfig, threads: int, text: str, data_name: str) -> dict:
    return {**asdict(config), "data": data_name, "data_sha256": hashlib.sha256(text.encode()).hexdigest(), "threads": threads}


def evaluation_key(metrics: dict) -> str:
    """`<windows>x<ctx>-<hash of every setting and the baseline>`, readable and unique per setting."""
    settings = metrics["settings"]
    identity = json.dumps({**settings, "baseline": metrics["baseline"]}, sort_keys=True, default=str)
    return f"{settings['windows']}x{settings['ctx']}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _stored(resolved: Target, source, settings: dict) -> dict | None:
    from edgequant.measurement.results import ResultsDB

    if resolved.artifact is None:
        return None
    db = ResultsDB.open()
    try:
        return db.find_evaluation(resolved.artifact.content_sha256,
                                  evaluation_key({"settings": settings, "baseline": str(source.path)}))
    finally:
        db.close()


def _store(artifact, metrics: dict) -> str:
    """Add the evaluation to the results store under the artifact's content and the settings; the
    artifact folder itself is not touched. Returns the settings' key."""
    from edgequant.measurement.results import ResultsDB

    key = evaluation_key(metrics)
    db = ResultsDB.open()
    try:
        db.save_evaluation(artifact.content_sha256, key, artifact.manifest.get("spec_text", ""), str(artifact.path),
                           {**metrics, "evaluation_key": key})
    finally:
        db.close()
    return key


def _speed_prompts(windows: Windows, length: int, count: int) -> list[list[int]]:
    """`count` different prompts of `length` tokens cut one after another from the evaluation
    windows (fewer, reused in turn by the probe, when the windows are too short for all)."""
    flat = windows.ids.reshape(-1)
    prompts = [flat[i * length:(i + 1) * length].tolist() for i in range(min(count, len(flat) // length))]
    return prompts if len(prompts) >= 2 else [flat[:length].tolist()] * 2


def _resolve_target(target) -> Target:
    from edgequant.artifact import is_artifact, open_artifact
    from edgequant.sources.source import load_source

    if target is not None and is_artifact(Path(target)):
        artifact = open_artifact(target)
        return Target(artifact.path, artifact, artifact.size_bytes, str(artifact.spec))
    source = load_source(target)
    return Target(source.path, None, source.weights_bytes, f"{BASELINE_SPEC} ({source.name})")


def _recorded_source(target: Target):
    if target.artifact is None:
        return target.path
    recorded = Path(target.artifact.manifest["source"]["path"])
    if not recorded.exists():
        raise EdgequantError(f"the artifact's source {recorded} no longer exists", "pass --baseline MODEL")
    return recorded


def _inputs_of(source, config: EvalConfig) -> tuple[str, str]:
    """What the source is scored on, as a text (hashed into the settings) and a name."""
    return _eval_text(config) if source.task == TEXT_GENERATION else task_inputs_identity(source)


def _eval_text(config: EvalConfig) -> tuple[str, str]:
    """The evaluation text and the name results give it."""
    from edgequant.measurement.evaldata import default_eval_text, read_text_file

    if config.data:
        return read_text_file(config.data), str(config.data)
    return default_eval_text(), "enwiki prose (gensim test data)"


def _make_windows(source, config: EvalConfig, text: str, data_name: str) -> Windows:
    """The token windows of `text` for this source, cached beside the reference: tokenizing loads
    transformers (and torch with it, 0.6 GB of RSS with Gemma-3's vocabulary), which no runner
    needs, so every evaluation after the first leaves it out of the process."""
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    key = hashlib.sha256(f"{source.fingerprint}:{text_sha}:{config.ctx}:{config.windows}:{_TOKENIZER_CHECK_CHARS}".encode())
    path = cache_dir("reference") / f"{source.fingerprint[:16]}-{key.hexdigest()[:16]}-windows.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        return Windows(np.asarray(cached["ids"], dtype=np.int64), text_sha, data_name, cached["check"])
    windows = _tokenize_windows(source, config, text, data_name)
    write_text_atomic(path, json.dumps({"ids": windows.ids.tolist(), "check": windows.extra}))
    return windows


def _tokenize_windows(source, config: EvalConfig, text: str, data_name: str) -> Windows:
    from edgequant.sources.auto_tokenizer import auto_tokenizer

    tokenizer = auto_tokenizer(source.hf_dir)
    # A model whose tokenizer starts every sequence with BOS sees each window that way, as llama.cpp's
    # perplexity tool does (Gemma without BOS scores about 30% worse); the rest see plain text.
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    per_window = config.ctx - (bos is not None)
    needed = per_window * config.windows
    chars = needed * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False).input_ids
        if len(ids) >= needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise EdgequantError(
            f"the evaluation text has {len(ids)} tokens; {config.windows} windows of {config.ctx} need {needed}",
            "pass a longer --data file, or fewer --windows / a smaller --ctx",
        )
    windows = np.asarray(ids[:needed], dtype=np.int64).reshape(config.windows, per_window)
    if bos is not None:
        windows = np.concatenate([np.full((config.windows, 1), bos, dtype=np.int64), windows], axis=1)
    sample = text[:_TOKENIZER_CHECK_CHARS]
    check_ids = tokenizer(sample, add_special_tokens=False, verbose=False).input_ids
    return Windows(windows, hashlib.sha256(text.encode()).hexdigest(), data_name,
                   {"check_text": sample, "check_ids": check_ids, "check_pieces": tokenizer.convert_ids_to_tokens(check_ids)})


def _reference_logprobs(source, windows: Windows, threads: int) -> Path:
    """The file of the baseline's log-probabilities on every window, float32 (an .npy). float16
    would put a floor of ~4e-5 under every KLD (its rounding alone): a float export's true ~5e-6
    could not be told from it. Each window is written to the file as soon as it is computed, so
    memory holds one window's (ctx x vocab), not all of them (4 windows at a 262k vocabulary are
    2.1 GB)."""
    path = cache_dir("reference") / f"{source.fingerprint[:16]}-{windows.key}-f32.npy"
    build_once(path, path, "computing the same PyTorch baseline", lambda: _compute_reference(source, windows, threads, path))
    return path


def _compute_reference(source, windows: Windows, threads: int, path: Path) -> None:
    n_windows, ctx = windows.ids.shape
    tmp = temp_sibling(path)
    with step(f"computing the PyTorch baseline on {n_windows} windows of {ctx} tokens (cached)"):
        with open_runner(source.path, n_ctx=ctx, threads=threads) as runner:
            out = None
            for i, window in enumerate(track(windows.ids, "baseline windows")):
                logits = runner.logits(window.tolist())
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_windows, *logits.shape))
                for start in range(0, ctx, _SCORE_ROWS):
                    out[i, start:start + _SCORE_ROWS] = log_softmax(logits[start:start + _SCORE_ROWS])
                del logits
            out.flush()
            del out
    tmp.rename(path)


def _quality(target: Target, source, windows: Windows, reference: Path, threads: int) -> tuple[TokenScores, str | None]:
    """Score the target's own logits on every window against the reference. A source model is
    run too, never taken to be the baseline: `eval MODEL --baseline OTHER` scores MODEL, and a
    model scored against itself checks that the cached reference still matches its run."""
    n_windows, ctx = windows.ids.shape
    per_window = []
    with open_runner(target.path, n_ctx=ctx, need_logits=True, threads=threads) as runner:
        _check_tokenizer(runner, windows)
        scored = runner.logits_of_windows([ids.tolist() for ids in windows.ids])
        for i, blocks in enumerate(track(scored, f"scoring {target.label}", total=n_windows)):
            per_window.append(_score_window(target, source, blocks, reference, i, windows.ids[i]))
        arithmetic = runner.arithmetic()
    return TokenScores(*(np.concatenate(x) for x in zip(*per_window)), window=ctx - 1), arithmetic


# Positions scored at a time: the float32 temporaries of a log-softmax and a KL divergence over a
# whole 512-token window at a 262k vocabulary are ~0.5 GB each; in slices they stay ~40 MB.
_SCORE_ROWS = 32


def _score_window(target: Target, source, blocks, reference: Path, window: int, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per scored position (every one but the last): the target's and the baseline's negative
    log-likelihood of the next token, the KL divergence baseline -> target, top-1 agreement.
    The target's logits come in blocks of rows; the reference is read a slice at a time, each
    through a mapping of its own (pages read through a long-lived mapping stay in this process's
    RSS: a window's are 0.5 GB at a 262k vocabulary)."""
    parts, done = [], 0
    for block in blocks:
        _check_vocabulary(target, source, block, reference)
        for offset in range(0, len(block), _SCORE_ROWS):
            start = done + offset
            stop = min(start + _SCORE_ROWS, done + len(block), len(ids) - 1)
            if stop <= start:
                break
            logp = log_softmax(block[offset:offset + stop - start])
            ref = np.array(np.load(reference, mmap_mode="r")[window, start:stop], dtype=np.float32)
            at, following = np.arange(stop - start), ids[start + 1:stop + 1]
            parts.append((-logp[at, following], -ref[at, following], kl_divergence(ref, logp), ref.argmax(-1) == logp.argmax(-1)))
        done += len(block)
        del block  # before the engine fills the next one
    return tuple(np.concatenate(x) for x in zip(*parts))


def _check_vocabulary(target: Target, source, logits: np.ndarray, reference: Path) -> None:
    vocab = np.load(reference, mmap_mode="r").shape[-1]
    if logits.shape[-1] != vocab:
        raise EdgequantError(f"{target.label} scores {logits.shape[-1]} tokens and the baseline {source.name} "
                             f"{vocab}: KL divergence needs one vocabulary",
                             "pass --baseline the model this one was converted or fine-tuned from")


def quality_figures(scores: TokenScores) -> dict:
    """Point figures over every scored token, with their 95% intervals (see `edgequant.measurement.intervals`).
    A negative per-token KLD is float rounding of a zero one: clipped to 0."""
    kld = np.maximum(scores.kld, 0)
    ppl, base_ppl = float(np.exp(scores.nll.mean())), float(np.exp(scores.baseline_nll.mean()))
    ci = bootstrap(TokenScores(scores.nll, scores.baseline_nll, kld, scores.top1, scores.window))
    return {
        "perplexity": round(ppl, 4),
        "baseline_perplexity": round(base_ppl, 4),
        "ppl_increase_pct": round(100 * (ppl / base_ppl - 1), 3),
        "kld_mean": round(float(kld.mean()), 7),
        "kld_p99": round(float(np.percentile(kld, 99)), 7),
        "top1_agreement": round(float(scores.top1.mean()), 5),
        "tokens_scored": int(scores.nll.size),
        "ci95": {"ppl_increase_pct": [round(v, 3) for v in ci["ppl_increase_pct"]],
                 "kld_mean": [round(v, 7) for v in ci["kld_mean"]],
                 "top1_agreement": [round(v, 5) for v in ci["top1_agreement"]]},
        "ci_method": interval_method(),
    }


def _check_tokenizer(runner, windows: Windows) -> None:
    """Fail loudly when the runner's tokenizer disagrees with the source's on the eval text."""
    got = runner.tokenize(windows.extra["check_text"])
    want = windows.extra["check_ids"]
    if got != want:
        first = first_difference(got, want)
        theirs = [runner.detokenize([t]) for t in got[first:first + 5]]
        raise EdgequantError(
            f"{runner.name}'s tokenizer disagrees with the source tokenizer on the evaluation text "
            f"(first difference at token {first}: {got[first:first + 5]} {theirs} vs the source's "
            f"{want[first:first + 5]} {windows.extra['check_pieces'][first:first + 5]})",
            "the artifact's vocabulary or pre-tokenizer was converted wrongly; re-create it or report the model",
        )
    note(f"tokenizer check passed: {runner.name} gives the source's {len(want)} ids on the eval text sample")


def machine_info() -> dict:
    import psutil

    from edgequant.decisions.hardware import int8_dot_product, read_cpu

    _, cpu, flags = read_cpu()
    found = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
             "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
             "load_avg_1m": round(os.getloadavg()[0], 2)}
    if dot_product := int8_dot_product(flags):
        found["int8_dot_product"] = dot_product
    return found
