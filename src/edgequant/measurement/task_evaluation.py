"""The evaluation of models of other tasks (see `edgequant.sources.tasks`): the target's outputs on
fixed inputs against the float baseline's on the same inputs (computed once per source and cached),
then speed and peak memory in a child process, as for causal LMs."""

from __future__ import annotations

import functools
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from edgequant.atomic import temp_sibling
from edgequant.errors import EdgequantError
from edgequant.paths import cache_dir
from edgequant.progress import step, track
from edgequant.registry import open_task_runner
from edgequant.sources.tasks import IMAGE_CLASSIFICATION, SENTENCE_EMBEDDING

QUALITY_BATCH = 16  # inputs per call while scoring (padding to the longest text in each)


def task_inputs_identity(source) -> tuple[str, str]:
    """(a text whose hash names the inputs, their name) for an evaluation's settings."""
    data = _inputs(source)
    # The interval method is part of what a stored evaluation means: photos resampled whole since 2026-12-04.
    return data.sha256 + (":photo-bootstrap" if hasattr(data, "groups") else ""), data.name


def evaluate_task(target, source, config, threads: int) -> dict:
    """Quality of `target` (an artifact or the source itself) against the source's float32 outputs,
    and, with `config.speed`, its speed in a child process."""
    if config.data is not None:
        raise EdgequantError(f"--data sets the text of causal LM evaluations; {source.name} is a {source.task} model, "
                             "scored on fixed inputs that ship in packages", "drop --data")
    data = _inputs(source)
    rows = _rows(data)
    reference = _reference_outputs(source, data, threads)
    with step(f"scoring {target.label} on {len(rows)} inputs"), open_task_runner(target.path, threads=threads) as runner:
        outputs = _run_all(runner, rows, f"scoring {target.label}")
        arithmetic = runner.arithmetic()
    metrics = {"target": target.label, "baseline": str(source.path), "task": source.task,
               **_figures(data, outputs, reference), "size_bytes": target.size_bytes,
               **({"arithmetic": arithmetic} if arithmetic else {})}
    if config.speed:
        metrics.update(_speed(target, rows, config, threads))
    return metrics


def _inputs(source):
    """The fixed evaluation inputs of the source's task."""
    if source.task not in (SENTENCE_EMBEDDING, IMAGE_CLASSIFICATION):
        raise EdgequantError(f"{source.task} models cannot be evaluated", "evaluate a causal LM, a sentence encoder or an image classifier")
    return _task_inputs(source.task, source.image if source.task == IMAGE_CLASSIFICATION else None)


@functools.lru_cache(maxsize=1)
def _task_inputs(task: str, image_settings):
    """Read (texts) or decoded and cut (176 photo views, 1-2 s) once: an evaluation names its inputs
    in its settings and then scores them, and a bench evaluates every spec on the same ones."""
    if task == SENTENCE_EMBEDDING:
        from edgequant.measurement.taskdata import encoder_eval_texts

        return encoder_eval_texts()
    from edgequant.measurement.imagedata import eval_images

    return eval_images(image_settings)


def _rows(data):
    """What a runner takes, one entry per input: texts, or preprocessed images."""
    return data.images if hasattr(data, "images") else data.texts


def _figures(data, outputs: np.ndarray, reference: np.ndarray) -> dict:
    from edgequant.measurement import task_scores

    if hasattr(data, "images"):
        return {**task_scores.classification_figures(outputs, reference, data.groups), "photos": data.photos}
    return task_scores.embedding_figures(outputs, reference, data.labels)


def _run_all(runner, inputs, label: str) -> np.ndarray:
    return runner.run_in_batches(inputs, QUALITY_BATCH, lambda batches: track(batches, label))


def _reference_outputs(source, data, threads: int) -> np.ndarray:
    """The baseline's outputs on every input, cached per source and inputs (an .npy)."""
    key = hashlib.sha256(f"{source.fingerprint}:{data.sha256}".encode()).hexdigest()[:16]
    path = cache_dir("reference") / f"{source.fingerprint[:16]}-{key}-{source.task}.npy"
    if not path.is_file():
        rows = _rows(data)
        with step(f"computing the float baseline on {len(rows)} inputs (cached)"):
            with open_task_runner(source.path, threads=threads) as runner:
                outputs = _run_all(runner, rows, "baseline")
        tmp = temp_sibling(path)
        with open(tmp, "wb") as fh:  # a file object: np.save would add .npy to the name
            np.save(fh, outputs.astype(np.float32))
        tmp.rename(path)
    return np.load(path)


def _speed(target, inputs, config, threads: int) -> dict:
    from edgequant.measurement.speed_probe import TaskSpeedRequest, run_in_child
    from edgequant.measurement.taskdata import write_inputs

    with step(f"measuring speed and peak memory of {target.label} in a child process"), \
            tempfile.TemporaryDirectory(prefix="edgequant-inputs-") as tmp:
        inputs_file = write_inputs(inputs, Path(tmp) / "inputs")
        request = TaskSpeedRequest(str(target.path) if target.path else None, str(inputs_file), config.repeats, threads)
        return run_in_child(request)
