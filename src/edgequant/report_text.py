"""Plain-text tables for people (the CLI's default output)."""

from __future__ import annotations


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_inspect(info: dict) -> str:
    lines = [
        f"model           {info['model']}",
        f"architecture    {info['architecture']} ({info['model_type']})",
        f"layers          {info['layers']}",
        f"hidden size     {info['hidden_size']}",
        f"heads / kv      {info['heads']} / {info['kv_heads']}",
        f"vocabulary      {info['vocab_size']}",
        f"context         {info['context_length']}",
        f"parameters      {info['parameters']:,} ({info['embedding_parameters']:,} in embeddings"
        f"{', tied' if info['tied_embeddings'] else ''})",
        f"dtype           {info['dtype']}",
        f"size on disk    {_mb(info['size_bytes'])}",
        f"tokenizer       {info['tokenizer']}",
        f"fingerprint     {info['fingerprint'][:16]}",
    ]
    if "gguf_tensor_types" in info:
        lines.append(f"GGUF types      {', '.join(info['gguf_tensor_types'])} (imported by dequantizing)")
    if "caveat" in info:
        lines.append(f"note            {info['caveat']}")
    lines += ["", "estimated size per precision:"]
    from edgequant.spec import parse_spec

    for spec_text, size in info["estimated_bytes"].items():
        spec = parse_spec(spec_text)
        from edgequant.backends import get_backend

        precision = get_backend(spec.format).precisions[spec.precision]
        flag = "  (needs an importance matrix)" if precision.needs_imatrix else ""
        lines.append(f"  {spec_text:<16} {precision.klass.value:<10} {precision.bpw:>6.2f} bpw  {_mb(size):>12}{flag}")
    return "\n".join(lines)


_METRIC_ROWS = [
    ("perplexity", "perplexity", "{:.4f}"),
    ("baseline_perplexity", "baseline perplexity", "{:.4f}"),
    ("ppl_increase_pct", "perplexity increase", "{:+.2f} %"),
    ("kld_mean", "KL divergence (mean)", "{:.5f}"),
    ("kld_p99", "KL divergence (p99)", "{:.5f}"),
    ("top1_agreement", "top-1 agreement", "{:.2%}"),
    ("tokens_scored", "tokens scored", "{:,}"),
    ("size_bytes", "size", None),
    ("load_s", "load time", "{:.2f} s"),
    ("peak_rss_mb", "peak RSS", "{:,.0f} MB"),
    ("ttft_ms", "time to first token", "{:.1f} ms"),
    ("prefill_tps", "prefill", "{:,.1f} tok/s"),
    ("decode_tps", "decode", "{:,.1f} tok/s"),
]


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['target']}  vs  {metrics['baseline']}"]
    for key, label, fmt in _METRIC_ROWS:
        if key in metrics:
            value = _mb(metrics[key]) if fmt is None else fmt.format(metrics[key])
            lines.append(f"  {label:<22} {value}")
    s = metrics["settings"]
    lines.append(f"  windows: {s['windows']} x {s['ctx']} tokens of {s['data']}; {s['threads']} threads; "
                 f"speed: median of {s['repeats']} runs, {s['prompt_tokens']}-token prompt, {s['gen_tokens']} generated")
    return "\n".join(lines)
