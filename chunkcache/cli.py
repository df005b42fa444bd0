"""The ``chunkcache`` command: answer questions over chunks, and a demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from chunkcache.errors import ChunkCacheError

EXIT_USAGE = 2


class CliError(ChunkCacheError):
    """A problem with the command line or its input files."""


def _engine(args: argparse.Namespace) -> Any:
    from chunkcache.config import Settings
    from chunkcache.engine import ChunkCacheEngine

    settings = Settings.load(
        getattr(args, "config", None), model=args.model, dtype=args.dtype,
        store_path=getattr(args, "store", None),
    )
    return ChunkCacheEngine(settings)


def cmd_strategies(args: argparse.Namespace) -> int:
    from chunkcache.blend import describe_strategies
    from chunkcache.config import Settings
    from chunkcache.engine import STRATEGY_SETTINGS

    settings = Settings.load(args.config)
    print(describe_strategies({k: getattr(settings, k) for k in STRATEGY_SETTINGS}))
    print(f"\ndefault strategy (Settings.strategy): {settings.strategy}")
    return 0


def _read_input(path: str) -> tuple[str, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"input file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"input file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or "question" not in data or "chunks" not in data:
        raise CliError(f'input file {path} must be a JSON object {{"question": str, "chunks": [str, ...]}}')
    if not isinstance(data["question"], str) or not isinstance(data["chunks"], list):
        raise CliError(f"in {path}, question must be a string and chunks a list of strings")
    return data["question"], data["chunks"]


def _strategy_params(args: argparse.Namespace) -> dict[str, Any]:
    """``--recompute-ratio`` as a parameter, after checking ``--strategy`` (a spec) and that the
    strategy takes it: a bad spec fails here, before the model loads."""
    from chunkcache.blend import make_strategy, parse_strategy_spec

    params = {} if args.recompute_ratio is None else {"recompute_ratio": args.recompute_ratio}
    if args.strategy is not None:
        name, spec_params = parse_strategy_spec(args.strategy)
        make_strategy(name, **{**spec_params, **params})
    return params


def cmd_answer(args: argparse.Namespace) -> int:
    from chunkcache.engine import check_request

    params = _strategy_params(args)
    question, chunks = _read_input(args.input)
    check_request(question, chunks)  # before the model loads: bad input fails at once
    engine = _engine(args)
    answer = engine.answer(question, chunks, strategy=args.strategy, max_new_tokens=args.max_new_tokens, **params)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print(answer.text)
        print(
            f"[{answer.strategy}] ttft {answer.ttft_s * 1000:.0f} ms, prompt {answer.prompt_tokens} tokens, "
            f"reused {answer.reused_tokens}, recomputed {answer.recomputed_tokens}",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from chunkcache.demo import run_demo

    engine = _engine(args)
    index_dir = Path(args.index) if args.index else engine.settings.store_path.parent / "demo-index"
    run_demo(engine, index_dir, args.limit, args.recompute_ratio, args.max_new_tokens)
    engine.close()
    return 0


def cmd_bench_ttft(args: argparse.Namespace) -> int:
    from chunkcache.eval.datasets import load_examples
    from chunkcache.eval.ttft import bench_ttft, format_table, plot_ttft

    dataset = _bundled_or(args.dataset)
    lengths = [] if args.natural else _ints(args.lengths, "--lengths")
    examples = load_examples(dataset, args.limit if args.natural else None, args.passages if args.natural else None)
    strategies = [s for s in args.strategies.split(",") if s.strip()]
    engine = _engine(args)
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

    engine = _engine(args)
    report = run_decode_bench(engine.model.executor, _ints(args.batches, "--batches"),
                              _ints(args.contexts, "--contexts"), args.steps, max_kv_bytes=parse_bytes(args.max_kv))
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'decode.json', report)}")
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
    report = bench_codecs(_engine(args), examples[0], codecs, args.repeats, device=args.device)
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
    engine = _engine(args)
    remote = args.remote_url or engine.settings.remote_url or None
    report = bench_store(engine, examples, remote, args.entry_tokens, args.entries, args.repeats)
    report["dataset"] = str(dataset)
    if not remote:
        report["remote_note"] = "no remote_url given: the remote tier was not measured"
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'store.json', report)}")
    return 0


def cmd_bench_precompute(args: argparse.Namespace) -> int:
    from chunkcache.eval.precompute_bench import bench_precompute, format_table

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    defaults = [shared / n for n in ("musique_s.jsonl", "wikimqa_s_clean.jsonl", "hotpotqa_s.jsonl")]
    paths = [Path(p) for p in args.dataset] if args.dataset else [p for p in defaults if p.exists()]
    if not paths:
        raise CliError("no corpus: pass --dataset FILE (a QA file whose passages are precomputed)")
    try:
        report = bench_precompute(_engine(args), paths, args.chunks, args.chunk_tokens, args.batch,
                                  args.bare_every, not args.quiet)
    except ValueError as exc:
        raise CliError(f"{exc}; add --dataset files or ask for fewer --chunks") from None
    print(format_table(report))
    if args.out:
        print(f"wrote {_write_json(Path(args.out), 'precompute.json', report)}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from chunkcache.config import Settings
    from chunkcache.jobs.ingest import ingest

    if not args.paths and not args.delete:
        raise CliError("give files or folders to ingest, or --delete DOC_ID")
    settings = Settings.load(getattr(args, "config", None), model=args.model)
    report, removed, total = ingest(
        args.paths, Path(args.index), settings, args.text_field, args.chunk_tokens, args.overlap, args.factory,
        args.delete or (),
    )
    print(f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, {removed} deleted "
          f"documents; +{report.chunks_added} / -{report.chunks_removed} chunks; {total} chunks in {args.index}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from chunkcache.jobs.precompute import precompute_index
    from chunkcache.retriever import ChunkIndex

    index = ChunkIndex.load(args.index)
    try:
        if args.backend == "ray":
            from chunkcache.config import Settings
            from chunkcache.jobs.ray_backend import precompute_ray

            settings = Settings.load(getattr(args, "config", None), model=args.model, dtype=args.dtype,
                                     store_path=getattr(args, "store", None))
            summary, _ = precompute_ray(index, settings, args.workers, args.batch, args.ray_address)
        else:
            engine = _engine(args)
            summary = precompute_index(engine, index, args.batch, not args.quiet, args.bare_every)
            engine.close()
    finally:
        index.close()
    s = summary
    print(f"{s.chunks} chunks: {s.computed} computed, {s.skipped} already stored; {s.tokens} tokens in "
          f"{s.seconds:.1f} s ({s.chunks_per_s:.2f} chunks/s, {s.tokens_per_s:.0f} tokens/s)")
    if s.bare_tokens_per_s and s.vs_bare:
        print(f"bare batched prefill loop on {s.bare_batches} of the same batches: {s.bare_tokens_per_s:.0f} "
              f"tokens/s; precompute reached {s.vs_bare:.0%} of it on those batches")
    if s.stored_bytes is not None:
        print(f"store now holds {s.stored_bytes / 1e6:.1f} MB (disk/remote)")
    if args.json:
        print(json.dumps(s.to_dict()))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from chunkcache.pipeline import RAGPipeline
    from chunkcache.retriever import ChunkIndex

    index = ChunkIndex.load(args.index)
    try:
        engine = _engine(args)
        params = _strategy_params(args)
        result = RAGPipeline(index, engine).answer(
            args.question, top_k=args.top_k, strategy=args.strategy, max_new_tokens=args.max_new_tokens, **params
        )
    finally:
        index.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.text)
    print("\nsources:")
    for hit in result.sources:
        print(f"  {hit.score:.3f}  {hit.doc_id}  {hit.chunk_id[:12]}")
    t = result.timings
    print(f"\ntimings: retrieve {t['retrieve_s'] * 1e3:.0f} ms, load {t['load_s'] * 1e3:.0f} ms, "
          f"blend {t['blend_s'] * 1e3:.0f} ms, first token {t['ttft_s'] * 1e3:.0f} ms")
    return 0


def _persistent_store(args: argparse.Namespace) -> Any:
    """The configured store's persistent tiers (disk, remote): memory tiers live in one process."""
    from chunkcache.codec import get_codec
    from chunkcache.config import Settings
    from chunkcache.store import build_store

    settings = Settings.load(getattr(args, "config", None), store_path=getattr(args, "store", None))
    tiers = [t for t in settings.store_tiers.split(",") if t.strip() in ("disk", "remote")]
    if settings.store_tiers.strip() == "auto":
        tiers = ["disk"] + (["remote"] if settings.remote_url else [])
    if not tiers:
        raise CliError("the configured store has no persistent tier (disk or remote) to inspect")
    import dataclasses

    return build_store(dataclasses.replace(settings, store_tiers=",".join(tiers)), get_codec(settings.codec))


def _variant_stats(args: argparse.Namespace) -> dict[str, Any] | None:
    """Cache-Craft's variants next to the store: counts and CCI quartiles (None when there are none)."""
    from chunkcache.config import Settings
    from chunkcache.store.policy import quantile
    from chunkcache.store.variants import VariantIndex

    settings = Settings.load(getattr(args, "config", None), store_path=getattr(args, "store", None))
    folder = Path(settings.store_path) / "variants"
    if not folder.exists():
        return None
    index = VariantIndex(folder)
    try:
        found = index.stats()
    finally:
        index.close()
    cci = found["cci"]
    quartiles = [quantile(cci, q) for q in (0.25, 0.5, 0.75)] if cci else []
    return {"chunks": found["chunks"], "variants": found["variants"], "cci_quartiles": quartiles}


def cmd_cache(args: argparse.Namespace) -> int:
    from chunkcache.store.policy import parse_bytes, victims

    store = _persistent_store(args)
    try:
        if args.cache == "stats":
            stats = store.stats()
            variants = _variant_stats(args)
            if args.json:
                print(json.dumps(stats | ({"cachecraft_variants": variants} if variants else {}), indent=2))
            for name, s in ({} if args.json else stats).items():
                budget = "unbounded" if s["budget_bytes"] is None else f"{s['budget_bytes'] / 1e6:.1f} MB"
                print(f"{name}: {s['entries']} entries, {s['bytes'] / 1e6:.1f} MB (budget {budget})")
            if variants and not args.json:
                q = variants["cci_quartiles"]
                print(f"cachecraft variants: {variants['variants']} for {variants['chunks']} chunks; CCI quartiles "
                      + (", ".join(f"{x:.2f}" for x in q) if q else "-"))
        elif args.cache == "ls":
            for tier in store.tiers:
                for info in sorted(tier.infos(), key=lambda i: -i.last_access):
                    print(f"{tier.name}\t{info.key}\t{info.nbytes}\t{info.tokens}\t{info.hits}")
        elif args.cache == "evict":
            tiers = [t for t in store.tiers if args.tier in (None, t.name)]
            if args.keys:
                for key in args.keys:
                    store.evict(key, args.tier)
                print(f"evicted {len(args.keys)} key(s) from {', '.join(t.name for t in tiers)}")
            elif args.to_bytes is not None:
                target = parse_bytes(args.to_bytes) or 0
                for tier in tiers:
                    infos = tier.infos()
                    drop = victims(infos, tier.policy, sum(i.nbytes for i in infos), target, 0)
                    for info in drop:
                        tier.delete(info.key)
                    print(f"{tier.name}: evicted {len(drop)} entries by {tier.policy.name}")
            else:
                raise CliError("cache evict needs keys or --to-bytes N")
        elif args.cache == "clear":
            if not args.yes:
                raise CliError("cache clear deletes every entry; add --yes to confirm")
            store.clear(args.tier)
            print(f"cleared {args.tier or 'every tier'}")
    finally:
        store.close()
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
    engine = _engine(args)
    tokenizer = engine.model.tokenizer

    def truncate(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[: args.chunk_tokens])

    examples = load_examples(
        Path(args.dataset), args.limit, args.passages, args.seed if args.shuffle else None,
        truncate if args.chunk_tokens else None,
    )
    max_new = args.max_new_tokens or 32
    rows = run_eval(
        engine, examples, args.strategies.split(","), max_new, args.seed, progress=not args.quiet, codecs=codecs,
        recurring=args.workload == "recurring",
    )
    metric = "rouge_l" if any(e.task == "summary" for e in examples) else "qa_f1_score"
    meta = {
        "model": engine.settings.model, "dataset": args.dataset, "dtype": engine.settings.dtype,
        "max_new_tokens": max_new, "metric": metric, "seed": args.seed, "passages": args.passages,
        "shuffled": args.shuffle, "chunk_tokens": args.chunk_tokens, "codecs": codecs or [engine.codec.spec],
        "workload": args.workload,
        "command": "chunkcache " + shlex.join(sys.argv[1:]) if args.record_command else None,
    }
    from chunkcache.eval.report import to_markdown

    report = write_report(rows, meta, Path(args.out), args.seed)
    print(to_markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}, report.md, examples.jsonl and plots")
    return 0


STRATEGY_HELP = ("fusion strategy spec NAME[:VALUE][:KEY=VALUE...], e.g. cacheblend:0.15:spread_v=0.5 "
                 "(default: settings; `chunkcache strategies` lists names and parameters)")


def build_parser() -> argparse.ArgumentParser:
    from chunkcache.model.registry import PACKAGED_MODELS

    parser = argparse.ArgumentParser(
        prog="chunkcache",
        description="Answer questions over retrieved chunks by fusing their precomputed KV caches.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help=f"packaged model ({', '.join(PACKAGED_MODELS)}) or a local Hugging Face folder")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), help="model dtype (default float32)")
        p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG)")
        p.add_argument("--store", help="folder of the chunk-cache store (default ~/.cache/chunkcache/store)")
        p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")

    p = sub.add_parser("strategies", help="every fusion strategy, its parameters and their defaults, and the spec syntax")
    p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG): its defaults are shown")
    p.set_defaults(func=cmd_strategies)

    from chunkcache.api.cli import add_serve_parser

    add_serve_parser(sub, common)

    p = sub.add_parser("answer", help="answer a question over chunks given in a JSON file")
    common(p)
    p.add_argument("--input", required=True, help='JSON file {"question": str, "chunks": [str, ...]}')
    p.add_argument("--strategy", default=None, help=STRATEGY_HELP)
    p.add_argument("--recompute-ratio", type=float, default=None,
                   help="share of tokens to recompute (cacheblend, cachecraft); overrides the spec's")
    p.add_argument("--json", action="store_true", help="print the answer and its stats as one JSON object")
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("demo", help="ingest a bundled corpus, precompute it, answer by retrieval with full prefill and cacheblend")
    common(p)
    p.add_argument("--limit", type=int, default=2, help="how many bundled questions (max 3)")
    p.add_argument("--index", help="index folder for the bundled corpus (default: next to the store)")
    p.add_argument("--recompute-ratio", type=float, default=0.15)
    p.set_defaults(func=cmd_demo, max_new_tokens=32)

    p = sub.add_parser("eval", help="quality and TTFT of each strategy beside full prefill on a QA dataset")
    common(p)
    p.add_argument("--dataset", required=True, help="JSON Lines file in any format of the shared data folder")
    p.add_argument("--limit", type=int, default=None, help="first N examples")
    p.add_argument("--strategies", default="full,reuse,cacheblend:0.15,cacheblend:0.3,ape,epic",
                   help="comma-separated name[:value]; controls: cacheblend:1.0, cacheblend-random:R")
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
    p.add_argument("--remote-url", help="redis:// URL of the remote tier to measure (default: the remote_url setting)")
    p.add_argument("--entry-tokens", type=int, default=512, help="tokens per entry in the put/get test")
    p.add_argument("--entries", type=int, default=20, help="entries put and read per tier")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="folder for store.json")
    p.set_defaults(func=cmd_bench_store)

    from chunkcache.api.cli import add_load_parser

    add_load_parser(bench, common)

    p = bench.add_parser("decode", help="batched decode: ms per step and tokens/s per batch size and context")
    common(p)
    p.add_argument("--batches", default="1,8,32", help="sequences decoded together")
    p.add_argument("--contexts", default="1024,8192", help="tokens already in each sequence's cache")
    p.add_argument("--steps", type=int, default=16, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--max-kv", default="8GiB", help="skip a row whose caches would need more than this")
    p.add_argument("--out", help="folder for decode.json")
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("precompute", help="precompute throughput beside a bare batched prefill loop on the same chunks")
    common(p)
    p.add_argument("--dataset", action="append",
                   help="QA file whose passages form the corpus (repeatable); default: musique_s, 2WikiMQA and "
                        "HotpotQA from ../shared/data")
    p.add_argument("--chunks", type=int, default=2000, help="chunks to precompute")
    p.add_argument("--chunk-tokens", type=int, default=256, help="chunk size in tokens")
    p.add_argument("--batch", type=int, help="chunks per batched prefill (default: the precompute_batch setting, 8)")
    p.add_argument("--bare-every", type=int, default=5, help="time the bare loop on every Nth batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", help="folder for precompute.json")
    p.set_defaults(func=cmd_bench_precompute)

    p = sub.add_parser("ingest", help="chunk, embed and index documents (.txt .md .html .jsonl); incremental")
    p.add_argument("paths", nargs="*", help="files or folders")
    p.add_argument("--index", required=True, help="index folder (created if missing)")
    p.add_argument("--model", help="serving model whose tokenizer counts chunk tokens (default: settings)")
    p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG)")
    p.add_argument("--text-field", default="text", help=".jsonl: the field holding the text")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk at most")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive chunks")
    p.add_argument("--factory", default="Flat", help="faiss index factory for a new index (Flat, HNSW32,Flat, IVF...)")
    p.add_argument("--delete", action="append", metavar="DOC_ID", help="remove a document (repeatable)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("precompute", help="compute and store every chunk cache of an index (resumable)")
    common(p)
    p.add_argument("--index", required=True, help="index folder built by chunkcache ingest")
    p.add_argument("--batch", type=int, help="chunks per batched prefill (default: the precompute_batch setting, 8)")
    p.add_argument("--bare-every", type=int, default=10,
                   help="also time the bare prefill loop on every Nth batch, for the summary (0: never)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="ray: Ray Data map_batches, one actor per GPU or --workers CPU actors (chunkcache[ray])")
    p.add_argument("--workers", type=int, default=2, help="ray: actors when there is no GPU")
    p.add_argument("--ray-address", help="ray: cluster address (default: start a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("query", help="retrieve chunks for a question and answer from their cached KV")
    common(p)
    p.add_argument("question")
    p.add_argument("--index", required=True, help="index folder built by chunkcache ingest")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--strategy", default=None, help=STRATEGY_HELP)
    p.add_argument("--recompute-ratio", type=float, default=None,
                   help="share of tokens to recompute (cacheblend, cachecraft); overrides the spec's")
    p.add_argument("--json", action="store_true", help="print answer, sources and timings as one JSON object")
    p.set_defaults(func=cmd_query)

    cache = sub.add_parser("cache", help="inspect and manage the configured store (disk, remote tiers)")
    cache_sub = cache.add_subparsers(dest="cache", required=True)
    for name, text in (("stats", "entries, bytes and budget per tier"), ("ls", "entries: tier, key, bytes, tokens, hits"),
                       ("evict", "remove keys, or evict by policy down to a size"), ("clear", "delete every entry")):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG)")
        p.add_argument("--store", help="folder of the disk tier (default ~/.cache/chunkcache/store)")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print the stats as JSON")
        if name in ("evict", "clear"):
            p.add_argument("--tier", choices=("disk", "remote"), help="only this tier")
        if name == "evict":
            p.add_argument("keys", nargs="*", help="chunk keys to remove")
            p.add_argument("--to-bytes", help="evict by the tier's policy until it holds at most this much (e.g. 1GiB)")
        if name == "clear":
            p.add_argument("--yes", action="store_true", help="confirm")
        p.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a hard dependency
            pass
    try:
        return int(args.func(args))
    except ChunkCacheError as exc:
        print(f"chunkcache: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("chunkcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
