"""`edgequant eval`: perplexity, KLD, top-1 agreement, size, memory and speed of an artifact."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.commands import common


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KLD, top-1 agreement, size, memory and speed of an artifact")
    p.add_argument("target", nargs="?", help="artifact folder, or a model to evaluate with PyTorch (default: the embedded model)")
    p.add_argument("--baseline", help="reference model (default: the artifact's source)")
    p.add_argument("--adapter", type=Path, metavar="FOLDER",
                   help="a LoRA adapter in PEFT's format merged into TARGET when it is a model (an artifact's source "
                        "already holds any adapter it was converted with)")
    common.add_eval_options(p)
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurement")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.measurement.evaluation import evaluate
    from edgequant.reporting.report_text import format_metrics

    target = args.target
    if args.adapter is not None:
        from edgequant.adaptation.merge import adapted_model
        from edgequant.artifact import is_artifact
        from edgequant.errors import EdgequantError

        if args.target and is_artifact(Path(args.target)):
            raise EdgequantError(f"{args.target} is an artifact: its source already holds any adapter it was converted with",
                                 "drop --adapter, or convert the model with --adapter first")
        target = adapted_model(args.target, args.adapter)
    metrics = evaluate(target, args.baseline, common.eval_config(args, speed=not args.no_speed))
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0
