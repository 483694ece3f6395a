"""pipelines run | validate | status | data check | schema | report | compare | serve  (also `python -m pipelines ...`).

User errors (bad recipe, bad data, lock held, failed stage) print one clear message and exit 2;
a traceback only ever means a bug in pipelines itself.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

from pipelines import quiet
from pipelines.errors import PipelinesError


def _load(args):
    from pipelines.recipe import load_recipe

    return load_recipe(args.recipe, overrides=getattr(args, "overrides", []) or [])


def cmd_validate(args) -> int:
    recipe = _load(args)
    print(f"{args.recipe}: OK — {len(recipe.stages)} stage(s), {len(recipe.cards)} data card(s)")
    for st in recipe.stages:
        src = [f"data<-{st.data_stage}" if st.data_stage else f"data={st.spec.data}"] if st.spec.data else []
        src += [f"{role}<-{ref}" for role, ref in st.spec.inputs.items()]
        print(f"  {st.name:<16} {st.type:<10} {' '.join(src)}")
    return 0


def cmd_run(args) -> int:
    from pipelines import runner

    recipe = _load(args)
    steps = runner.run(recipe, only=args.only, from_=args.from_, force=args.force, dry_run=args.dry_run)
    if args.dry_run:
        print(f"plan for {args.recipe} (output_dir {recipe.output_dir}):")
        for s in steps:
            print(f"  {s.stage.name:<16} {s.action:<7} state={s.state:<8} {s.reason}")
    return 0


def _fmt_metrics(metrics: dict, limit: int = 4) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def cmd_status(args) -> int:
    from pipelines import runner

    recipe = _load(args)
    if args.watch is None:
        return _print_status(recipe, args.json)
    while True:  # until no `pipelines run` holds the output folder (Ctrl-C stops watching, not the run)
        if sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        holder = runner.lock_holder(recipe.output_dir)
        _print_status(recipe, args.json)
        if holder is None:
            print("no run in progress")
            return 0
        who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}" if holder else "another process"
        print(f"running: {who}; refreshing every {args.watch:g} s (Ctrl-C stops watching)", flush=True)
        time.sleep(args.watch)


def _print_status(recipe, as_json: bool) -> int:
    from pipelines import runner

    rows = runner.status(recipe)
    if as_json:
        print(json.dumps({"recipe": str(recipe.path), "output_dir": str(recipe.output_dir), "stages": rows}, indent=2))
        return 0
    print(f"{recipe.name}  ({recipe.output_dir})")
    print(f"  {'stage':<16} {'type':<10} {'state':<8} {'time':>8}  metrics")
    for r in rows:
        t = f"{r['seconds']:.1f}s" if r["seconds"] is not None else "-"
        extra = _fmt_metrics(r["metrics"]) or (r["error"] or "")
        print(f"  {r['name']:<16} {r['type']:<10} {r['state']:<8} {t:>8}  {extra}")
        for v in r["baselines"]:
            print(f"  {'':<16} {'':<10} {'':<8} {'':>8}  {_verdict(v)}")
    return 0


def _verdict(v: dict) -> str:
    """One line per split: does the stage's model beat the task's best trivial baseline?"""
    what = "beats" if v["beats"] else "DOES NOT BEAT"
    return (f"{v['split']}: {v['metric']} {v['value']:.4g} {what} the {v['baseline']} baseline "
            f"({v['baseline_value']:.4g})" + ("" if v["beats"] else ": the model learned less than a trivial one"))


def cmd_data_check(args) -> int:
    from pipelines.data import load_card

    card = load_card(args.card)
    dsd = card.load()
    print(f"{card.path}: {card.name} ({card.format}), license: {card.license}")
    for split, ds in dsd.items():
        note = card.split_notes.get(split, "")
        print(f"  {split:<11} {len(ds):>8} rows  columns={ds.column_names}" + (f"  ({note})" if note else ""))
    if card.label_names:
        import collections

        first = next(iter(dsd.values()))
        if "tags" in first.column_names:  # conll: tag counts over the train tokens
            counts = collections.Counter(t for row in dsd["train"]["tags"] for t in row) if "train" in dsd else {}
            print("  tokens: " + ", ".join(f"{s}={sum(map(len, d['tokens'])):,}" for s, d in dsd.items()))
            print("  tags (train): " + ", ".join(f"{n}={counts.get(i, 0)}" for i, n in enumerate(card.label_names)))
        elif "labels" in first.column_names:  # several labels per row
            rows = dsd["train"]["labels"] if "train" in dsd else []
            counts = collections.Counter(t for row in rows for t in row)
            none = sum(1 for row in rows if not row)
            print("  labels (train): " + ", ".join(f"{n}={counts.get(i, 0)}" for i, n in enumerate(card.label_names))
                  + f"; rows without a label: {none}, mean labels per row: {sum(map(len, rows)) / max(len(rows), 1):.2f}")
        else:
            counts = collections.Counter(dsd["train"]["label"]) if "train" in dsd else {}
            print("  labels: " + ", ".join(f"{n}={counts.get(i, 0)}" for i, n in enumerate(card.label_names)))
    return 0


def cmd_schema(args) -> int:
    from pipelines.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def cmd_report(args) -> int:
    from pipelines.report import write_report

    paths = write_report(_load(args))
    print("\n".join(f"wrote {p}" for p in paths))
    if args.screenshot:
        from pipelines.browser import check_page

        check = check_page(paths[1], screenshot=Path(args.screenshot), clip_height=args.screenshot_height)
        problems = check.problems()
        print(f"opened {paths[1]} in headless Chromium: {len(check.images)} image(s), "
              f"{len(problems)} problem(s); wrote {check.screenshot}")
        if problems:
            raise PipelinesError("the report does not display cleanly:\n  " + "\n  ".join(problems))
    return 0


def cmd_serve(args) -> int:
    from pipelines.serve import ServeSettings, api_keys, serve

    settings = ServeSettings(
        batching=not args.no_batching, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_chars=args.max_chars, max_items=args.max_items, max_new_tokens=args.max_new_tokens, threads=args.threads,
        max_image_bytes=args.max_image_bytes, api_keys=api_keys(args.api_key), metrics_open=not args.metrics_auth,
        grpc_port=args.grpc_port, continuous_batching=args.continuous_batching,
    )
    serve(args.path, stage=args.stage, host=args.host, port=args.port, quantize=args.quantize, settings=settings)
    return 0


def cmd_compare(args) -> int:
    from pipelines.compare import compare

    paths = compare(args.runs, Path(args.out))
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipelines", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_cmd(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("recipe", help="recipe YAML file")
        sp.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE, e.g. stages.tokenizer.config.vocab_size=8000")
        return sp

    sp = recipe_cmd("run", "run every stage that is not done (resuming interrupted ones)")
    sp.add_argument("--only", metavar="STAGE[,STAGE]", help="run only these stages, in recipe order (the inputs "
                    "they do not run must be done)")
    sp.add_argument("--from", dest="from_", metavar="STAGE", help="re-run this stage and every later one")
    sp.add_argument("--force", action="store_true", help="re-run the selected stages even if done")
    sp.add_argument("--dry-run", action="store_true", help="print the plan (run / skip / resume, and why)")
    sp.set_defaults(func=cmd_run)

    recipe_cmd("validate", "check the recipe and its data cards; does no work").set_defaults(func=cmd_validate)

    sp = recipe_cmd("status", "a table of stages: state, time, key metrics")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 5) while a `pipelines run` of this recipe is in progress")
    sp.set_defaults(func=cmd_status)

    dp = sub.add_parser("data", help="data card tools")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    cp = dsub.add_parser("check", help="load and validate the data set a card describes")
    cp.add_argument("card")
    cp.set_defaults(func=cmd_data_check)

    sub.add_parser("schema", help="JSON Schema of recipes (for editors)").set_defaults(func=cmd_schema)

    sp = recipe_cmd("report", "write <output_dir>/report/report.md (+ .html, PNG plots)")
    sp.add_argument("--screenshot", metavar="PNG", help="then open report.html in headless Chromium, fail unless every "
                    "image loads with no console error and no fetch outside the report, and save a screenshot")
    sp.add_argument("--screenshot-height", type=int, metavar="PX", help="keep only the top PX pixels of the screenshot")
    sp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="two or more runs side by side: config differences, metrics, curves")
    cp.add_argument("runs", nargs="+", metavar="RUN_OR_RECIPE", help="recipe files or run directories")
    cp.add_argument("--out", default="compare", help="folder for compare.md / compare.html / plots (default ./compare)")
    cp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("serve", help="serve a trained model over HTTP (FastAPI + uvicorn) and gRPC")
    sp.add_argument("path", metavar="RUN_OR_MODEL_DIR", help="a model folder, a stage folder, or a run directory + --stage")
    sp.add_argument("--stage", help="the stage to serve when PATH is a run directory")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--quantize", choices=["none", "dynamic-int8"], default="none", help="quantize at load (CPU)")
    sp.add_argument("--no-batching", action="store_true", help="one model call per request")
    sp.add_argument("--max-batch", type=int, default=16, help="texts per batched model call")
    sp.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    sp.add_argument("--max-chars", type=int, default=2000, help="longest text accepted (413 above)")
    sp.add_argument("--max-items", type=int, default=64, help="most texts (images) in one request")
    sp.add_argument("--max-image-bytes", type=int, default=10_000_000, help="largest image file accepted (413 above)")
    sp.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens a client may ask for")
    sp.add_argument("--threads", type=int, help="torch threads (default: one per core; fewer helps on a busy machine)")
    sp.add_argument("--api-key", action="append", metavar="KEY", help="require `Authorization: Bearer KEY` on every "
                    "endpoint but /health (repeat for several keys; or $PIPELINES_API_KEYS, comma-separated)")
    sp.add_argument("--metrics-auth", action="store_true", help="with API keys: key /metrics too (default: open)")
    sp.add_argument("--grpc-port", type=int, metavar="N", help="also serve gRPC (pipelines.v1.Inference, health, "
                    "reflection: pipelines/proto/inference.proto) on port N of --host, beside HTTP")
    sp.add_argument("--continuous-batching", action="store_true", help="causal LMs: requests join and leave the "
                    "running batch at every step (transformers' continuous batching) instead of sharing one "
                    "generate() call each (pipelines/continuous.py)")
    sp.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGUSR1"):
        # a run that seems hung (a collective waiting on a dead peer, a build lock): `kill -USR1 PID`
        # prints every thread's Python stack to stderr and the run goes on
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError):  # stderr without a file descriptor (captured by a caller, embedded)
            pass
    quiet.install()  # warnings and log lines a user cannot act on (pipelines/quiet.py names each)
    parser = build_parser()
    # overrides may come after options (`run R --dry-run k=v`): argparse leaves those over
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    try:
        return args.func(args) or 0
    except PipelinesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the next `pipelines run` resumes from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pipelines status R | head`: the reader left; no traceback for that
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
