"""`chunkcache serve` (and the benches that run a server: `bench load`, `bench fuzz`): build the service from Settings (YAML + CHUNKCACHE_* env, then flags), after
the model gate (`chunkcache.jobs.check_model.serve_gate`), and run it with uvicorn."""

from __future__ import annotations

import argparse
import os
import re

from chunkcache.cli.common import CommonArgs
from chunkcache.errors import InvalidInputError


def add_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the HTTP service (OpenAI-compatible and /v1/rag/* endpoints)")
    common(p)
    p.add_argument("--index", help="index folder to retrieve from and add documents to (setting index_path)")
    p.add_argument("--host", help="address to listen on (setting host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (setting port, default 8000)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--allow-unchecked-model", action="store_true", default=None,
                   help="start even if the model fails `chunkcache check-model` (setting allow_unchecked_model); "
                        "otherwise the check runs once per model and its verdict is reused")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from chunkcache.api import RagService, create_app
    from chunkcache.config import Settings
    from chunkcache.jobs.check_model import serve_gate

    settings = Settings.from_args(args, index_path=args.index, host=args.host, port=args.port,
                                  max_new_tokens=args.max_new_tokens, allow_unchecked_model=args.allow_unchecked_model)
    # before the service loads anything: an unsupported or failing model is refused here
    print(f"chunkcache serve: {serve_gate(settings).message}", flush=True)
    service = RagService(settings)
    if settings.warm_up:  # kernels compiled and libraries started before the first user waits
        print(f"chunkcache serve: warmed up in {service.engine.warm_up():.1f} s", flush=True)
    key_note = (f"API key required (from ${settings.api_key_env})"
                if settings.api_key_env and os.environ.get(settings.api_key_env) else "no API key")
    print(f"chunkcache serve: {settings.model} on http://{settings.host}:{settings.port} "
          f"(index: {settings.index_path or 'none'}; {key_note})", flush=True)
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def add_load_parser(bench: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    p = bench.add_parser("load", help="concurrent streaming clients against a chunkcache serve process")
    p.add_argument("--model", help="model the server loads (default: settings)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured, after the warm-up")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of load before measuring")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", default="",
                   help="requests decoded together, one run per value, side by side (e.g. 1,16; default: "
                        "settings); B:W also sets fusion_workers to W (e.g. 1,16:0,16)")
    p.add_argument("--out", help="folder for load.json")
    p.set_defaults(func=cmd_bench_load)


def add_fuzz_parser(bench: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = bench.add_parser("fuzz", help="schemathesis over the served OpenAPI schema, every check, against a real server")
    p.add_argument("--model", help="model the server loads (default: settings; a small one makes it quick)")
    p.add_argument("--cases", type=int, default=2000, help="about this many generated requests in all")
    p.add_argument("--checks", default="all", help="schemathesis checks (default: all)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", help="folder for fuzz.json")
    p.set_defaults(func=cmd_bench_fuzz)


def cmd_bench_fuzz(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from chunkcache.eval.fuzz import format_table, run_fuzz

    report = run_fuzz(args.model, args.cases, args.seed, args.checks, args.workers)
    print(format_table(report), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fuzz.log").write_text(report.pop("output"), encoding="utf-8")  # every failure, reproducible
        (out / "fuzz.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out / 'fuzz.json'} and fuzz.log")
    cases = report["test_cases"]
    return 0 if report["exit_code"] == 0 and not cases.get("with_failures") else 1


def cmd_bench_load(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from chunkcache.eval.load import compare_table, format_table, minute_table, run_load

    runs = [b.strip() for b in args.max_batch.split(",") if b.strip()] or [""]
    bad = [r for r in runs if r and not re.fullmatch(r"[1-9][0-9]*(:(-1|[0-9]+))?", r)]
    if bad:
        raise InvalidInputError(f"--max-batch takes B or B:W (B >= 1 requests, W fusion workers, -1 for auto), "
                                f"comma-separated; got {', '.join(bad)}")
    reports = []
    for run in runs:
        batch, _, workers = run.partition(":")
        env = {"CHUNKCACHE_MAX_BATCH": batch} if batch else {}
        if workers:
            env["CHUNKCACHE_FUSION_WORKERS"] = workers
        report = run_load(args.model, args.clients, args.duration, args.warmup, args.max_tokens, extra_env=env)
        report["max_batch"] = int(batch) if batch else None
        report["fusion_workers"] = int(workers) if workers else None
        print(format_table(report), flush=True)
        if len(report["per_minute"]) > 1:
            print(minute_table(report), flush=True)
        reports.append(report)
    if len(reports) > 1:
        print(compare_table(reports))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        body = reports[0] if len(reports) == 1 else {"runs": reports}
        (out / "load.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out / 'load.json'}")
    return 1 if any(r["server_errors"] for r in reports) else 0
