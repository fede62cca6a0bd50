"""`edgequant imatrix`: compute an importance matrix over calibration text."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.commands import common
from edgequant.sources.importance import ImatrixConfig


def add(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama.cpp's imatrix format) over calibration text")
    common.add_model_argument(p)
    p.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: the built-in calibration text, "
                                              "disjoint from the evaluation text)")
    p.add_argument("--tokens", type=int, default=ImatrixConfig.tokens,
                   help=f"calibration tokens, in chunks of 512 (default {ImatrixConfig.tokens})")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write, e.g. imatrix.gguf")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.sources.importance import ImatrixConfig, compute_imatrix

    facts = compute_imatrix(ImatrixConfig(args.output, common.model_path(args), args.calib, args.tokens))
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(f"{facts['output']}\t{facts['tensors']} matrices\t{facts['chunks']} chunks of {facts['chunk_size']} tokens"
              f"\t{facts['seconds']} s")
    return 0
