"""`chunkcache eval` and `chunkcache bench ...`: the quality evaluation and the speed benchmarks,
each printing a table and writing JSON. Engines come from the shared options
(`chunkcache.cli.common.engine_from_args`), so settings are loaded one way for every command."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from chunkcache.cli.common import CommonArgs, engine_from_args
from chunkcache.errors import ChunkCacheError, CliError


def cmd_bench_ttft(args: argparse.Namespace) -> int:
    from chunkcache.eval.datasets import load_examples
    from chunkcache.eval.ttft import bench_ttft, format_table, plot_ttft

    dataset = _bundled_or(args.dataset)
    lengths = [] if args.natural else _ints(args.lengths, "--lengths")
    examples = load_examples(dataset, args.limit if args.natural else None, args.passages if args.natural else None)
    strategies = [s for s in args.strategies.split(",") if s.strip()]
    engine = engine_from_args(args)
    try:
        report = bench_ttft(engine, examples, strategies, args.repeats, lengths, _ints(args.chunks, "--chunks"))
    except ValueError as exc:
        if isinstance(exc, ChunkCacheError):
            raise
        raise CliError(f"{exc}; use a dataset with longer passages or smaller --lengths") from None
    report["dataset"] = str(dataset)
    print(format_table(report))
    if args.out:
        path = _write_json(Path(args.out), "ttft.json", report)
        plot_ttft(report, path.with_name("ttft.png"))
        print(f"wrote {path} and {path.with_name('ttft.png')}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from chunkcache.eval.decode_bench import format_table, run_decode_bench
    from chunkcache.store.policy import parse_bytes

    engine = engine_from_args(args)
    report = run_decode_bench(engine.model.executor, _ints(args.batches, "--batches"),
                              _ints(args.contexts, "--contexts"), args.steps, max_kv_bytes=parse_bytes(args.max_kv),
                              modes=args.modes.split(",") if args.modes else [engine.settings.decode_mode])
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'decode.json', report)}")
    return 0


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    from chunkcache.eval.cluster import format_table, run_cluster

    report = run_cluster(args.backend, _bundled_or(args.dataset), args.model, args.examples, args.passages,
                         args.max_tokens, args.top_k)
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), f'cluster-{args.backend}.json', report)}")
    return 0


def _bundled_or(dataset: str | None) -> Path:
    return Path(dataset) if dataset else Path(str(resources.files("chunkcache").joinpath("data/demo.json")))


def _write_json(out: Path, name: str, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out / name


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from chunkcache.eval.codec_bench import bench_codecs, format_table
    from chunkcache.eval.datasets import load_examples

    dataset = _bundled_or(args.dataset)
    examples = [e for e in load_examples(dataset, None, args.passages) if e.chunks]
    if not examples:
        raise CliError(f"{dataset} has no example with passages to encode")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    report = bench_codecs(engine_from_args(args), examples[0], codecs, args.repeats, device=args.device)
    report["dataset"] = str(dataset)
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'codec.json', report)}")
    return 0


def cmd_bench_store(args: argparse.Namespace) -> int:
    from chunkcache.eval.datasets import load_examples
    from chunkcache.eval.store_bench import bench_store, format_table

    dataset = _bundled_or(args.dataset)
    examples = [e for e in load_examples(dataset, None, args.passages) if e.chunks]
    if not examples:
        raise CliError(f"{dataset} has no example with passages")
    engine = engine_from_args(args)
    remote = args.remote_url or ([engine.settings.remote_url] if engine.settings.remote_url else [])
    report = bench_store(engine, examples, remote, args.entry_tokens, args.entries, args.repeats)
    report["dataset"] = str(dataset)
    if not remote:
        report["remote_note"] = "no remote_url given: the remote tier was not measured"
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'store.json', report)}")
    return 0


def cmd_bench_precompute(args: argparse.Namespace) -> int:
    from chunkcache.config import Settings
    from chunkcache.eval.precompute_bench import bench_precompute, format_table

    shared = Settings.from_args(args).data_dir
    defaults = [shared / n for n in ("musique_s.jsonl", "wikimqa_s_clean.jsonl", "hotpotqa_s.jsonl")]
    paths = [Path(p) for p in args.dataset] if args.dataset else [p for p in defaults if p.exists()]
    if not paths:
        raise CliError("no corpus: pass --dataset FILE (a QA file whose passages are precomputed)")
    try:
        report = bench_precompute(engine_from_args(args), paths, args.chunks, args.chunk_tokens, args.batch,
                                  args.bare_every, not args.quiet)
    except ValueError as exc:
        raise CliError(f"{exc}; add --dataset files or ask for fewer --chunks") from None
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'precompute.json', report)}")
    return 0
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise CliError(f"{flag} values must be positive")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    import shlex

    from chunkcache.eval.datasets import load_examples
    from chunkcache.eval.harness import run_eval, strategy_labels
    from chunkcache.eval.report import write_report

    codecs = [c.strip() for c in (args.codec or "").split(",") if c.strip()]
    strategy_labels(args.strategies.split(","), codecs)  # a bad name fails before the model loads
    engine = engine_from_args(args)
    tokenizer = engine.model.tokenizer

    def truncate(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[: args.chunk_tokens])

    if args.skip < 0:
        raise CliError("--skip takes a whole number of examples, 0 or more")
    examples = load_examples(
        Path(args.dataset), args.skip + args.limit if args.limit else None, args.passages,
        args.seed if args.shuffle else None, truncate if args.chunk_tokens else None,
    )[args.skip :]
    max_new = args.max_new_tokens or 32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "examples.partial.jsonl"  # a run stopped early keeps what it finished

    def keep(row: dict[str, Any]) -> None:
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chunkcache-corpus-") as tmp:
        corpus = None
        if args.corpus_index:
            from chunkcache.eval.corpus import corpus_index

            corpus = corpus_index(Path(args.dataset), Path(tmp), truncate if args.chunk_tokens else None)
        try:
            rows = run_eval(
                engine, examples, args.strategies.split(","), max_new, args.seed, progress=not args.quiet,
                codecs=codecs, recurring=args.workload == "recurring", corpus=corpus, on_row=keep,
            )
        finally:
            if corpus is not None:
                corpus.close()
    metric = "rouge_l" if any(e.task == "summary" for e in examples) else "qa_f1_score"
    meta = {
        "model": engine.settings.model, "dataset": args.dataset, "dtype": engine.settings.dtype,
        "max_new_tokens": max_new, "metric": metric, "seed": args.seed, "passages": args.passages,
        "shuffled": args.shuffle, "chunk_tokens": args.chunk_tokens, "codecs": codecs or [engine.codec.spec],
        "workload": args.workload, "skip": args.skip, "corpus_index": args.corpus_index,
        "chunk_primer": engine.settings.chunk_primer, "neighbours": engine.settings.neighbours,
        "neighbour_tokens": engine.settings.neighbour_tokens,
        "command": "chunkcache " + shlex.join(sys.argv[1:]) if args.record_command else None,
    }
    from chunkcache.eval.report import to_markdown

    report = write_report(rows, meta, out, args.seed)
    partial.unlink(missing_ok=True)
    print(to_markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}, report.md, examples.jsonl and plots")
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    _add_eval_parser(sub, common)
    _add_bench_parsers(sub, common)


def _add_eval_parser(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("eval", help="quality and TTFT of each strategy beside full prefill on a QA dataset")
    common(p)
    p.add_argument("--dataset", required=True, help="JSON Lines file in any format of the shared data folder")
    p.add_argument("--limit", type=int, default=None, help="first N examples (after --skip)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N examples (a held-out slice)")
    p.add_argument("--strategies", default="full,reuse,cacheblend:0.15,cacheblend:0.3,ape,epic",
                   help="comma-separated name[:value]; controls: cacheblend:1.0, cacheblend-random:R; a spec "
                        "ending in #neighbours computes its chunks behind their neighbours (needs --corpus-index), "
                        "#primer behind the primer alone")
    p.add_argument("--corpus-index", action="store_true",
                   help="pool every passage of the dataset file into one index first: the corpus that "
                        "chunk_primer: neighbours (and #neighbours specs) take each chunk's neighbours from")
    p.add_argument("--out", required=True, help="folder for report.json, report.md, examples.jsonl, PNGs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap, shuffling and random-selection seed")
    p.add_argument("--workload", choices=("standard", "recurring"), default="standard",
                   help="recurring: each example's passages are first seen in a full prefill that keeps "
                        "cachecraft variants, then every strategy answers with them re-ordered (seeded)")
    p.add_argument("--passages", type=int, default=None, help="chunks kept per example (default all)")
    p.add_argument("--shuffle", action="store_true", help="shuffle each example's chunks (with --seed)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="token budget per chunk")
    p.add_argument("--codec", default=None,
                   help="codec(s) chunk caches pass through, comma-separated (raw, int8, kivi2, cachegen-1..3); "
                        "with several, each strategy is reported per codec as spec@codec")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-record-command", dest="record_command", action="store_false",
                   help="leave the command line out of the report")
    p.set_defaults(func=cmd_eval)


def _add_bench_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    bench = sub.add_parser("bench", help="speed benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("ttft", help="time to first token of each strategy beside full prefill (warm caches)")
    common(p)
    p.add_argument("--dataset", help="QA file in any shared-data format; default: the bundled MuSiQue sample")
    p.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens to sweep")
    p.add_argument("--chunks", default="4", help="chunk counts to sweep (each chunk: length / count tokens)")
    p.add_argument("--natural", action="store_true", help="time the dataset's examples as they are instead of a sweep")
    p.add_argument("--limit", type=int, default=3, help="--natural: examples to time")
    p.add_argument("--passages", type=int, default=6, help="--natural: chunks kept per example, in order")
    p.add_argument("--strategies", default="full,reuse,cacheblend:0.15,ape,epic", help="comma-separated name[:value]")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds after a warm-up; each asks the question one word longer (new prompt shapes)")
    p.add_argument("--out", help="folder for ttft.json")
    p.set_defaults(func=cmd_bench_ttft)
    from chunkcache.codec import BENCH_CODECS

    p = bench.add_parser("codec", help="size, speed and error of each KV codec on real chunks")
    common(p)
    p.add_argument("--dataset", help="QA file whose first example's passages are encoded; default: bundled MuSiQue")
    p.add_argument("--passages", type=int, default=6, help="chunks taken from that example, in order")
    p.add_argument("--codecs", default=",".join(BENCH_CODECS), help="comma-separated codec specs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", help="where entries decode (cpu, cuda, cuda:N); default: the model's device")
    p.add_argument("--out", help="folder for codec.json")
    p.set_defaults(func=cmd_bench_codec)

    p = bench.add_parser("store", help="put/get speed per store tier, and TTFT with caches served from each")
    common(p)
    p.add_argument("--dataset", help="QA file; its first example is timed; default: bundled MuSiQue")
    p.add_argument("--passages", type=int, default=6, help="chunks of that example, in order")
    p.add_argument("--remote-url", action="append",
                   help="redis:// or mooncake:// URL of a remote tier to measure; repeat to measure several "
                        "(default: the remote_url setting)")
    p.add_argument("--entry-tokens", type=int, default=512, help="tokens per entry in the put/get test")
    p.add_argument("--entries", type=int, default=20, help="entries put and read per tier")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="folder for store.json")
    p.set_defaults(func=cmd_bench_store)

    from chunkcache.cli.serve import add_fuzz_parser, add_load_parser

    add_load_parser(bench, common)
    add_fuzz_parser(bench)

    p = bench.add_parser("decode", help="batched decode: ms per step and tokens/s per batch size and context")
    common(p)
    p.add_argument("--batches", default="1,8,32", help="sequences decoded together")
    p.add_argument("--contexts", default="1024,8192", help="tokens already in each sequence's cache")
    p.add_argument("--steps", type=int, default=16, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--max-kv", default="8GiB", help="skip a row whose caches would need more than this")
    p.add_argument("--modes", help="decode modes side by side, e.g. loop,kernel,graphs (default: the decode_mode setting)")
    p.add_argument("--out", help="folder for decode.json")
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("cluster", help="two servers over one corpus and one shared tier (redis or Mooncake, "
                                         "started here): ingest on A, questions to B, the shared tier stopped midway")
    p.add_argument("--backend", choices=("mooncake", "redis"), default="mooncake", help="the shared tier's service")
    p.add_argument("--model", help="packaged model or local folder both servers load (default: the model setting)")
    p.add_argument("--dataset", help="QA file whose examples' passages are the corpus; default: bundled MuSiQue")
    p.add_argument("--examples", type=int, default=6, help="examples (questions) used")
    p.add_argument("--passages", type=int, default=4, help="passages per example ingested")
    p.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per answer")
    p.add_argument("--out", help="folder for cluster.json")
    p.set_defaults(func=cmd_bench_cluster)

    p = bench.add_parser("precompute", help="precompute throughput beside a bare batched prefill loop on the same chunks")
    common(p)
    p.add_argument("--dataset", action="append",
                   help="QA file whose passages form the corpus (repeatable); default: musique_s, 2WikiMQA and "
                        "HotpotQA from the data_dir setting (../shared/data)")
    p.add_argument("--chunks", type=int, default=2000, help="chunks to precompute")
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunk size in tokens")
    p.add_argument("--batch", type=int, help="chunks per batched prefill (default: the precompute_batch setting, 8)")
    p.add_argument("--bare-every", type=int, default=5, help="time the bare loop on every Nth batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", help="folder for precompute.json")
    p.set_defaults(func=cmd_bench_precompute)
