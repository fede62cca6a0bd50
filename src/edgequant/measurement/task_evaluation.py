"""The evaluation of models of other tasks (see `edgequant.sources.tasks`): the target's outputs on
fixed inputs against the float baseline's on the same inputs (computed once per source and cached),
then speed and peak memory in a child process, as for causal LMs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.measurement.taskdata import encoder_eval_texts
from edgequant.paths import cache_dir
from edgequant.progress import step, track
from edgequant.registry import open_task_runner
from edgequant.sources.tasks import SENTENCE_EMBEDDING

QUALITY_BATCH = 16  # inputs per call while scoring (padding to the longest text in each)


def task_inputs_identity(task: str) -> tuple[str, str]:
    """(a text whose hash names the inputs, their name) for an evaluation's settings."""
    data = _inputs(task)
    return "\n".join(data.texts), data.name


def evaluate_task(target, source, config, threads: int) -> dict:
    """Quality of `target` (an artifact or the source itself) against the source's float32 outputs,
    and, with `config.speed`, its speed in a child process."""
    from edgequant.measurement.task_scores import embedding_figures

    if config.data is not None:
        raise EdgequantError(f"--data sets the text of causal LM evaluations; {source.name} is a {source.task} model, "
                             "scored on fixed labelled inputs", "drop --data")
    data = _inputs(source.task)
    reference = _reference_outputs(source, data, threads)
    with step(f"scoring {target.label} on {len(data.texts)} inputs"), open_task_runner(target.path, threads=threads) as runner:
        outputs = _run_all(runner, data.texts, f"scoring {target.label}")
        arithmetic = runner.arithmetic()
    metrics = {"target": target.label, "baseline": str(source.path), "task": source.task,
               **embedding_figures(outputs, reference, data.labels), "size_bytes": target.size_bytes,
               **({"arithmetic": arithmetic} if arithmetic else {})}
    if config.speed:
        metrics.update(_speed(target, data.texts, config, threads))
    return metrics


def _inputs(task: str):
    if task != SENTENCE_EMBEDDING:
        raise EdgequantError(f"{task} models cannot be evaluated yet", "evaluate a causal LM or a sentence encoder")
    return encoder_eval_texts()


def _run_all(runner, inputs, label: str) -> np.ndarray:
    batches = [inputs[i:i + QUALITY_BATCH] for i in range(0, len(inputs), QUALITY_BATCH)]
    return np.concatenate([runner.run(batch) for batch in track(batches, label)])


def _reference_outputs(source, data, threads: int) -> np.ndarray:
    """The baseline's outputs on every input, cached per source and inputs (an .npy)."""
    key = hashlib.sha256(f"{source.fingerprint}:{data.sha256}".encode()).hexdigest()[:16]
    path = cache_dir("reference") / f"{source.fingerprint[:16]}-{key}-{source.task}.npy"
    if not path.is_file():
        with step(f"computing the PyTorch baseline on {len(data.texts)} inputs (cached)"):
            with open_task_runner(source.path, threads=threads) as runner:
                outputs = _run_all(runner, data.texts, "baseline")
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, outputs.astype(np.float32))
        tmp.rename(path)
    return np.load(path)


def _speed(target, inputs, config, threads: int) -> dict:
    from edgequant.measurement.speed_probe import TaskSpeedRequest, run_in_child
    from edgequant.measurement.taskdata import write_inputs

    with step(f"measuring speed and peak memory of {target.label} in a child process"), \
            tempfile.TemporaryDirectory(prefix="edgequant-inputs-") as tmp:
        inputs_file = Path(tmp) / "inputs.json"
        write_inputs(inputs, inputs_file)
        request = TaskSpeedRequest(str(target.path) if target.path else None, str(inputs_file), config.repeats, threads)
        return run_in_child(request)
