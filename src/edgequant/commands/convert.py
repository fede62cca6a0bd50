"""`edgequant convert`: convert and quantize a model to one or more specs."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.commands import common


def add(sub) -> None:
    p = sub.add_parser("convert", help="convert and quantize a model to one or more specs")
    common.add_model_argument(p)
    p.add_argument("--to", required=True, metavar="SPEC[,SPEC...]", help="e.g. gguf:q4_k_m or gguf:q8_0,gguf:q4_k_m")
    p.add_argument("-o", "--output", type=Path, help="artifact folder (a parent folder when several specs are given)")
    p.add_argument("--force", action="store_true", help="rebuild even when the artifact already exists, and convert even where the "
                   "memory estimate says it will not fit")
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.conversion import ConvertConfig, run_convert
    from edgequant.registry import parse_specs

    specs = parse_specs(args.to)  # every spec is checked before any work starts
    model = common.model_path(args)
    artifacts = []
    for spec in specs:
        output = args.output / spec.slug if args.output and len(specs) > 1 else args.output
        artifacts.append(run_convert(ConvertConfig(spec, model, output, args.force)))
    if args.json:
        print(json.dumps([a.manifest for a in artifacts], indent=2))
    else:
        for artifact in artifacts:
            print(f"{artifact.spec}\t{artifact.size_bytes / 1e6:.1f} MB\t{artifact.path}")
    return 0
