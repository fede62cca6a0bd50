"""Command line: each subcommand turns argv into one call of the Python API.

Only argparse is imported at start-up; a subcommand imports what it needs when it runs, so
`edgequant --help` stays instant. `EdgequantError` becomes a two-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgequant.errors import EdgequantError

MODEL_HELP = "Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe a model and estimate its size at every precision")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_inspect)


def _add_hardware(sub) -> None:
    p = sub.add_parser("hardware", help="describe this machine and name the closest hardware profile")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--profiles", action="store_true", help="list every profile instead")
    p.set_defaults(run=_run_hardware)


def _add_recommend(sub) -> None:
    p = sub.add_parser("recommend", help="a format and precision for a target device and constraints, and why")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--target", metavar="PROFILE", help="hardware profile (default: the one closest to this machine; "
                                                       "`edgequant hardware --profiles` lists them)")
    p.add_argument("--max-memory", metavar="SIZE", help="peak memory bound, e.g. 1GB or 400MB")
    p.add_argument("--max-size", metavar="SIZE", help="artifact size bound, e.g. 150MB")
    p.add_argument("--min-speedup", type=float, metavar="X", help="decode speed-up over the fp32 baseline (measured)")
    p.add_argument("--max-kld", type=float, help="mean KLD bound (its whole 95%% interval must pass)")
    p.add_argument("--max-ppl-increase", metavar="PCT", help="perplexity increase bound in percent, e.g. 5%%")
    p.add_argument("--measured", action="store_true", help="measure the installed candidates the database lacks first")
    p.add_argument("--db", type=Path, help="results database (default: the cache's)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_recommend)


def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="measure candidates for a target, pick the best passing every gate, certify it")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--target", metavar="PROFILE", help="hardware profile (default: the one closest to this machine)")
    p.add_argument("--gate", action="append", default=[], metavar="EXPR",
                   help="e.g. kld<=0.05, ppl_increase<=5%%, ppl_change<=5%%, top1>=0.9, size<=120MB, peak_rss<=400MB, "
                        "speedup>=2, ttft<=300ms; repeat it (default: ppl_change<=5%% kld<=0.1 speedup>=2 "
                        "memory_reduction>=50%%)")
    p.add_argument("--objective", default="size", metavar="FIGURE",
                   help="what the winner is best at among those that pass: size, speed, quality (KLD) or a gate's "
                        "figure such as top1 or ttft (default: size)")
    p.add_argument("--budget", type=int, default=20, help="evaluations at most, neighbours included (default 20)")
    p.add_argument("--no-search", action="store_true", help="measure the candidates only, not their neighbours")
    p.add_argument("-o", "--output", type=Path, default=Path("edgequant-optimized"),
                   help="folder for the winner, certificate.json and certificate.html (default ./edgequant-optimized)")
    p.add_argument("--save-recipe", type=Path, metavar="FILE", help="also write a recipe (YAML) that reproduces this run")
    p.add_argument("--db", type=Path, help="results database (default: the cache's)")
    p.add_argument("--windows", type=int, default=4, help="windows scored per candidate (default 4)")
    _add_eval_options(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_optimize)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an artifact folder against the certificate `optimize` wrote")
    p.add_argument("certificate", type=Path, help="certificate.json")
    p.add_argument("artifact", type=Path, help="the artifact folder (the certificate's model/ folder, or a copy)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_verify)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a recipe (YAML): source, target, specs or search, eval settings, gates, output")
    p.add_argument("recipe", type=Path, help="recipe file; `edgequant optimize --save-recipe FILE` writes one")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan and its estimated time")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_recipe)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert and quantize a model to one or more specs")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--to", required=True, metavar="SPEC[,SPEC...]", help="e.g. gguf:q4_k_m or gguf:q8_0,gguf:q4_k_m")
    p.add_argument("-o", "--output", type=Path, help="artifact folder (a parent folder when several specs are given)")
    p.add_argument("--force", action="store_true", help="rebuild even when the artifact already exists, and convert even where the "
                   "memory estimate says it will not fit")
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.set_defaults(run=_run_convert)


def _add_imatrix(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama.cpp's imatrix format) over calibration text")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: the built-in calibration text, "
                                              "disjoint from the evaluation text)")
    p.add_argument("--tokens", type=int, default=32768, help="calibration tokens, in chunks of 512 (default 32768)")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write, e.g. imatrix.gguf")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(run=_run_imatrix)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KLD, top-1 agreement, size, memory and speed of an artifact")
    p.add_argument("target", nargs="?", help="artifact folder, or a model to evaluate with PyTorch (default: the embedded model)")
    p.add_argument("--baseline", help="reference model (default: the artifact's source)")
    p.add_argument("--windows", type=int, default=8, help="windows scored (default 8)")
    _add_eval_options(p)
    p.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurement")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=_run_eval)


def _add_eval_options(p) -> None:
    p.add_argument("--data", type=Path, help="UTF-8 text to score (default: English Wikipedia prose from gensim)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the speed test")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per speed run")
    p.add_argument("--repeats", type=int, default=3, help="timed speed runs; the median is reported")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")


def _eval_config(args, windows: int, speed: bool = True):
    from edgequant.measurement.evaluation import EvalConfig

    return EvalConfig(ctx=args.ctx, windows=windows, data=args.data, speed=speed, prompt_tokens=args.prompt_tokens,
                      gen_tokens=args.gen_tokens, repeats=args.repeats, threads=args.threads)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="convert and evaluate a model at many specs; store results; write a report")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--to", metavar="SPEC[,SPEC...]", help="specs to compare (default: a representative set over every installed backend)")
    p.add_argument("--db", type=Path, help="results database (default: results.sqlite in the edgequant cache)")
    p.add_argument("--report", type=Path, help="write a self-contained HTML report here")
    p.add_argument("--markdown", type=Path, help="write a Markdown report here")
    p.add_argument("--json", type=Path, help="write the report data as JSON here")
    p.add_argument("--strict", action="store_true", help="stop at the first failing or unavailable spec")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when some specs failed (default: exit 1)")
    p.add_argument("--force", action="store_true", help="rebuild artifacts even when cached, and convert past the memory estimate")
    p.add_argument("--windows", type=int, default=4, help="windows scored per candidate (default 4)")
    _add_eval_options(p)
    p.set_defaults(run=_run_bench)


def _add_results(sub) -> None:
    p = sub.add_parser("results", help="query the results database")
    p.add_argument("--model", help="filter by model name or source fingerprint prefix")
    p.add_argument("--db", type=Path, help="results database (default: results.sqlite in the edgequant cache)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    p.set_defaults(run=_run_results)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve artifacts over an OpenAI-compatible REST API")
    p.add_argument("models", nargs="*", help="artifact folders or models (default: the embedded model, run by PyTorch)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("EDGEQUANT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or set EDGEQUANT_API_KEY)")
    p.add_argument("--ctx", type=int, default=2048, help="context length per model")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests per model before answering 429")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is cancelled")
    p.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    p.add_argument("--batch", type=int, default=4, help="requests decoded together where the engine supports it (1: one at a time)")
    p.set_defaults(run=_run_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgequant", description="Convert, quantize, evaluate and serve models for edge devices.")
    parser.add_argument("--version", action="version", version=f"edgequant {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_hardware, _add_recommend, _add_optimize, _add_verify, _add_run, _add_convert,
                _add_imatrix, _add_eval, _add_bench, _add_results, _add_serve):
        add(sub)
    return parser


def _version() -> str:
    from edgequant import __version__

    return __version__


def _run_inspect(args) -> int:
    from edgequant.reporting.report_text import format_inspect
    from edgequant.sources.inspection import inspect_model

    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _run_hardware(args) -> int:
    from edgequant.decisions.hardware import closest, detect, profiles
    from edgequant.reporting.report_text import format_hardware, format_profiles

    if args.profiles:
        listed = {name: vars(p) for name, p in profiles().items()}
        print(json.dumps(listed, indent=2) if args.json else format_profiles(listed))
        return 0
    machine = detect()
    profile, verdicts = closest(machine)
    found = {"machine": machine.to_json(), "profile": profile.name, "verdicts": verdicts}
    print(json.dumps(found, indent=2) if args.json else format_hardware(found, vars(profile)))
    return 0


def _run_recommend(args) -> int:
    from edgequant.decisions.recommend import RecommendConfig, recommend
    from edgequant.reporting.report_text import format_recommendation

    ppl = args.max_ppl_increase.rstrip("%") if args.max_ppl_increase else None
    try:
        ppl = float(ppl) if ppl is not None else None
    except ValueError:
        raise EdgequantError(f"--max-ppl-increase {args.max_ppl_increase!r} is not a percentage", "write e.g. 5%") from None
    config = RecommendConfig(Path(args.model) if args.model else None, args.target, args.max_memory, args.max_size,
                             args.min_speedup, args.max_kld, ppl, args.measured, args.db)
    result = recommend(config)
    print(json.dumps(result, indent=2) if args.json else format_recommendation(result))
    return 0 if result["recommendation"] else 1


def _run_optimize(args) -> int:
    from edgequant.decisions.optimize import OptimizeConfig, optimize
    from edgequant.reporting.report_text import format_optimize

    config = OptimizeConfig(Path(args.model) if args.model else None, args.target, tuple(args.gate), args.objective,
                            args.budget, search=not args.no_search, eval=_eval_config(args, args.windows),
                            output=args.output, db=args.db)
    if args.save_recipe:
        from edgequant.decisions.recipe import check_recipe_path

        check_recipe_path(args.save_recipe)
    result = optimize(config)
    if args.save_recipe:
        from edgequant.decisions.recipe import save_recipe

        save_recipe(config, args.save_recipe, result["profile"]["name"])
    print(json.dumps(result, indent=2) if args.json else format_optimize(result))
    return 0 if result["winner"] else 1


def _run_recipe(args) -> int:
    from edgequant.decisions.optimize import optimize, plan
    from edgequant.decisions.recipe import load_recipe, optimize_config
    from edgequant.reporting.report_text import format_optimize, format_plan

    config = optimize_config(load_recipe(args.recipe))
    if args.dry_run:
        found = plan(config)
        print(json.dumps(found, indent=2) if args.json else format_plan(found))
        return 0
    result = optimize(config)
    print(json.dumps(result, indent=2) if args.json else format_optimize(result))
    return 0 if result["winner"] else 1


def _run_verify(args) -> int:
    from edgequant.decisions.certificate import verify
    from edgequant.reporting.report_text import format_verify

    found = verify(args.certificate, args.artifact)
    print(json.dumps(found, indent=2) if args.json else format_verify(found))
    return 0 if found["ok"] else 1


def _run_convert(args) -> int:
    from edgequant.conversion import ConvertConfig, run_convert
    from edgequant.registry import parse_specs

    specs = parse_specs(args.to)  # every spec is checked before any work starts
    model = Path(args.model) if args.model else None
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


def _run_imatrix(args) -> int:
    from edgequant.sources.importance import ImatrixConfig, compute_imatrix

    facts = compute_imatrix(ImatrixConfig(args.output, Path(args.model) if args.model else None, args.calib, args.tokens))
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(f"{facts['output']}\t{facts['tensors']} matrices\t{facts['chunks']} chunks of {facts['chunk_size']} tokens"
              f"\t{facts['seconds']} s")
    return 0


def _run_eval(args) -> int:
    from edgequant.measurement.evaluation import evaluate
    from edgequant.reporting.report_text import format_metrics

    metrics = evaluate(args.target, args.baseline, _eval_config(args, args.windows, speed=not args.no_speed))
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


def _run_bench(args) -> int:
    from edgequant.measurement.benchmark import BenchConfig, run_bench
    from edgequant.reporting.report import build_report, render_markdown

    config = BenchConfig(Path(args.model) if args.model else None, args.to, args.db, args.report, args.markdown, args.json,
                         args.strict, args.force, _eval_config(args, args.windows))
    result = run_bench(config)
    print(render_markdown(build_report(result)))
    failed = [row.spec for row in result.rows if row.status == "failed"]
    if failed and not args.keep_going:
        print(f"edgequant: {len(failed)} of {len(result.rows)} specs failed ({', '.join(failed)}); the report says why "
              "(--keep-going exits 0 anyway)", file=sys.stderr)
        return 1
    return 0


def _run_results(args) -> int:
    from edgequant.measurement.results import ResultsDB
    from edgequant.reporting.report_text import format_results

    db = ResultsDB.open(args.db, create=False)
    rows = db.query(args.model)
    db.close()
    print(format_results(rows, "json" if args.json else "csv" if args.csv else "table"))
    return 0


def _run_serve(args) -> int:
    from edgequant.serving.app import ServeConfig, serve

    models = tuple(Path(m) for m in args.models) or (None,)
    if args.batch < 1:
        raise EdgequantError(f"--batch {args.batch} must be at least 1", "use --batch 1 to serve one request at a time")
    for model in models:
        if model is not None and not model.exists():
            raise EdgequantError(f"no such artifact or model: {model}", "pass folders written by `edgequant convert`")
    config = ServeConfig(models, args.host, args.port, args.api_key, args.ctx, args.max_queue, args.max_tokens_cap,
                         args.max_body_bytes, args.request_timeout, args.threads, args.batch)
    print(f"edgequant: serving {', '.join(m.name if m else 'default' for m in models)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    serve(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.run(args)
    except EdgequantError as exc:
        print(f"edgequant: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgequant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
