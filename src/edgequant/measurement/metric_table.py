"""The one table of the figures edgequant measures.

Each figure is declared once: the key an evaluation's metrics dict uses, its unit, which way is
better, whether it carries a 95% interval (in `metrics["ci95"][key]`), the results store's column
for it, how it prints, the name gates give it, and its kind. The kind decides what `optimize`
does when the target is not this machine: quality and size are measured here for real, speed is
skipped (this CPU is not the target's), memory is estimated from the artifact's size.

Gates, the results store, the reports, recommend, optimize and the certificate read this table
at call time, so a figure added here gates, stores, ranks and prints without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUALITY, SIZE, SPEED, MEMORY = "quality", "size", "speed", "memory"
BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Metric:
    key: str  # in an evaluation's metrics dict
    label: str  # the words a report prints
    kind: str  # QUALITY, SIZE, SPEED or MEMORY
    better: str  # "lower" or "higher"
    fmt: str  # one value, in `scale` times the metric's unit, e.g. "{:.4f}"
    unit: str = ""  # the unit values are kept in
    scale: float = 1.0  # the printed value is value * scale (bytes print as MB)
    gate: str | None = None  # the name a gate writes, e.g. `kld` in `kld<=0.1`; None: not gateable
    gate_units: dict = field(default_factory=lambda: {"": 1})  # units a gate may use -> factor to `unit`
    interval: bool = False  # a 95% interval in metrics["ci95"][key]
    spread: str | None = None  # the key of its [min, max] over timed repeats, for a speed figure
    column: str | None = None  # the results store's column; None: kept only in the row's JSON
    interval_column: str | None = None  # prefix of the store's `_lo` / `_hi` interval columns
    derived: bool = False  # computed against the fp32 baseline of the same run (gates.derived_metrics)
    in_report: bool = True  # a column of the bench report and a line of `eval`'s output
    what: str = ""  # one line for help and errors

    @property
    def lower_is_better(self) -> bool:
        return self.better == "lower"

    def order(self, value: float | None) -> float:
        """A sort key, best first; a missing figure sorts last."""
        if value is None:
            return float("inf")
        return value if self.lower_is_better else -value

    def show(self, value: float) -> str:
        return self.fmt.format(value * self.scale)


_PERCENT = {"": 1, "%": 1}
TABLE: tuple[Metric, ...] = (
    Metric("size_bytes", "size MB", SIZE, "lower", "{:.1f}", "B", scale=1e-6, gate="size", gate_units=BYTE_UNITS,
           column="size_bytes", what="artifact size on disk"),
    Metric("perplexity", "ppl", QUALITY, "lower", "{:.3f}", column="perplexity", what="perplexity on the evaluation text"),
    Metric("ppl_increase_pct", "ppl +%", QUALITY, "lower", "{:+.2f}", "%", gate="ppl_increase", gate_units=_PERCENT,
           interval=True, column="ppl_increase_pct", interval_column="ppl_increase",
           what="perplexity increase over the baseline"),
    Metric("ppl_change_pct", "ppl change %", QUALITY, "lower", "{:.2f}", "%", gate="ppl_change", gate_units=_PERCENT,
           interval=True, derived=True, in_report=False, what="perplexity change from the baseline, either way"),
    Metric("kld_mean", "KLD", QUALITY, "lower", "{:.4f}", gate="kld", interval=True, column="kld_mean",
           interval_column="kld_mean", what="mean KL divergence to the baseline"),
    Metric("kld_p99", "KLD p99", QUALITY, "lower", "{:.4f}", column="kld_p99", in_report=False,
           what="99th percentile of the per-token KL divergence"),
    Metric("top1_agreement", "top-1", QUALITY, "higher", "{:.1%}", gate="top1", interval=True, column="top1_agreement",
           interval_column="top1", what="top-1 agreement with the baseline"),
    # Image classifiers: class scores against the float32 baseline's on the same images (also top-1 and KLD).
    Metric("top5_agreement", "top-5", QUALITY, "higher", "{:.1%}", gate="top5", interval=True, column="top5_agreement",
           interval_column="top5", what="the baseline's first class among the target's five"),
    # Sentence encoders: embeddings against the float32 baseline's on the same texts.
    Metric("cosine_mean", "cosine", QUALITY, "higher", "{:.4f}", gate="cosine", interval=True, column="cosine_mean",
           interval_column="cosine_mean", what="mean cosine similarity of the embeddings to the baseline's"),
    Metric("cosine_p1", "cosine p1", QUALITY, "higher", "{:.4f}", gate="cosine_p1", interval=True, column="cosine_p1",
           interval_column="cosine_p1", what="1st percentile of the per-text cosine similarity to the baseline"),
    Metric("probe_accuracy", "probe acc", QUALITY, "higher", "{:.1%}", gate="accuracy", interval=True,
           column="probe_accuracy", interval_column="probe_accuracy",
           what="polarity accuracy of a cross-validated linear probe on the embeddings"),
    # A model with a LoRA adapter `finetune` trained merged in: the fine-tune's own held-out examples.
    Metric("finetune_loss", "fine-tune loss", QUALITY, "lower", "{:.4f}", gate="finetune_loss",
           what="loss on the fine-tune's held-out examples"),
    Metric("finetune_kept", "fine-tune kept", QUALITY, "higher", "{:.1%}", gate="finetune_kept", gate_units={"": 1, "%": 0.01},
           what="share of the fine-tune's held-out loss reduction kept (1 = the adapted float model's)"),
    Metric("decode_tps", "decode tok/s", SPEED, "higher", "{:.1f}", "tokens/s", spread="decode_tps_range", column="decode_tps",
           what="decode speed (median of the timed repeats)"),
    Metric("prefill_tps", "prefill tok/s", SPEED, "higher", "{:.1f}", "tokens/s", column="prefill_tps", in_report=False,
           what="prompt processing speed"),
    Metric("ttft_ms", "TTFT ms", SPEED, "lower", "{:.0f}", "ms", gate="ttft", gate_units={"": 1, "ms": 1, "s": 1000},
           column="ttft_ms", what="time to first token (median)"),
    Metric("latency_p50_ms", "latency ms", SPEED, "lower", "{:.2f}", "ms", gate="latency", gate_units={"": 1, "ms": 1, "s": 1000},
           column="latency_p50_ms", what="median time to run one input alone (a sentence, an image)"),
    Metric("latency_p95_ms", "p95 ms", SPEED, "lower", "{:.2f}", "ms", column="latency_p95_ms", in_report=False,
           what="95th percentile of the time to run one input alone"),
    Metric("inputs_per_s_b1", "inputs/s b1", SPEED, "higher", "{:.1f}", "inputs/s", spread="inputs_per_s_b1_range",
           column="inputs_per_s_b1", what="inputs per second, one at a time (median of the timed repeats)"),
    Metric("inputs_per_s_b8", "inputs/s b8", SPEED, "higher", "{:.1f}", "inputs/s", spread="inputs_per_s_b8_range",
           column="inputs_per_s_b8", what="inputs per second in batches of 8 (median of the timed repeats)"),
    Metric("load_s", "load s", SPEED, "lower", "{:.2f}", "s", column="load_s", in_report=False, what="time to load the model"),
    Metric("speedup", "speed-up", SPEED, "higher", "{:.2f}", "x", gate="speedup", gate_units={"": 1, "x": 1}, derived=True,
           in_report=False, what="decode tokens/s (other tasks: inputs/s at batch 8) over the fp32 baseline's, same run"),
    Metric("peak_rss_mb", "peak RSS MB", MEMORY, "lower", "{:.0f}", "MB", gate="peak_rss",
           gate_units={"": 1, "mb": 1, "gb": 1000}, column="peak_rss_mb", what="peak resident memory while generating"),
    Metric("model_rss_mb", "model MB", MEMORY, "lower", "{:.0f}", "MB",
           what="peak RSS less what the process held before the engine loaded"),
    Metric("memory_reduction_pct", "memory saved %", MEMORY, "higher", "{:.1f}", "%", gate="memory_reduction",
           gate_units=_PERCENT, derived=True, in_report=False, what="peak memory saved against the fp32 baseline"),
)


# The speed figure `speedup` compares with the baseline's: the first one a row has.
HEADLINE_SPEED = ("decode_tps", "inputs_per_s_b8")


@dataclass(frozen=True)
class TaskFigures:
    """Which figures speak for a task's quality and speed in reports."""

    quality: str  # the quality figure of the size/quality Pareto front and chart
    loss_label: str  # the chart's axis: how far `quality` is from the baseline's
    rank: str  # the figure whose intervals tell neighbouring candidates apart
    unusable_beyond: float  # past this `quality` a candidate is broken, not a trade-off
    speed: str  # the speed figure charted


TASK_FIGURES = {
    "text-generation": TaskFigures("ppl_increase_pct", "perplexity increase (%)", "kld_mean", 100.0, "decode_tps"),
    # An encoder whose embeddings average below 0.9 cosine to the float model's ranks neighbours differently.
    "sentence-embedding": TaskFigures("cosine_mean", "1 - mean cosine to fp32", "cosine_mean", 0.9, "inputs_per_s_b8"),
    # A classifier that picks the float model's class on fewer than half the images is broken.
    "image-classification": TaskFigures("top1_agreement", "1 - top-1 agreement with fp32", "top1_agreement", 0.5,
                                        "inputs_per_s_b8"),
}


def by_key(key: str) -> Metric:
    return {m.key: m for m in TABLE}[key]


def gateable() -> dict[str, Metric]:
    """Gate name -> metric, in the table's order."""
    return {m.gate: m for m in TABLE if m.gate}


def measured(kinds: tuple[str, ...] = (QUALITY, SIZE, SPEED, MEMORY)) -> list[Metric]:
    """The figures an evaluation itself gives (not derived against the baseline), of these kinds."""
    return [m for m in TABLE if not m.derived and m.kind in kinds]


def figures(metrics: dict, extra: tuple[str, ...] = ()) -> dict:
    """The table's figures present in `metrics` (and the `extra` keys), for JSON output."""
    keys = [m.key for m in TABLE if not m.derived] + ["ci95", *extra]
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}
