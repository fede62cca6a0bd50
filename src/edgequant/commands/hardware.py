"""`edgequant hardware`: describe this machine and name the closest hardware profile."""

from __future__ import annotations

import json


def add(sub) -> None:
    p = sub.add_parser("hardware", help="describe this machine and name the closest hardware profile")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--profiles", action="store_true", help="list every profile instead")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.hardware import closest, detect, int8_dot_product, profiles
    from edgequant.reporting.report_text import format_hardware, format_profiles

    if args.profiles:
        listed = {name: vars(p) for name, p in profiles().items()}
        print(json.dumps(listed, indent=2) if args.json else format_profiles(listed))
        return 0
    machine = detect()
    profile, verdicts = closest(machine)
    found = {"machine": machine.to_json(), "profile": profile.name, "verdicts": verdicts,
             "int8_dot_product": int8_dot_product(set(machine.isa))}
    print(json.dumps(found, indent=2) if args.json else format_hardware(found, vars(profile)))
    return 0
