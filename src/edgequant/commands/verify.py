"""`edgequant verify`: check an artifact folder against the certificate `optimize` wrote."""

from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("verify", help="check an artifact folder against the certificate `optimize` wrote")
    p.add_argument("certificate", type=Path, help="certificate.json")
    p.add_argument("artifact", type=Path, help="the artifact folder (the certificate's model/ folder, or a copy)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.certificate import verify
    from edgequant.reporting.report_text import format_verify

    found = verify(args.certificate, args.artifact)
    print(json.dumps(found, indent=2) if args.json else format_verify(found))
    return 0 if found["ok"] else 1
