"""The ``chunkcache`` command: answer, query, ingest, precompute, serve, check-model, cache, the demo, and (from
`chunkcache.eval.cli`) eval and the benches; ``chunkcache --help`` lists them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from chunkcache.errors import ChunkCacheError, CliError, InvalidInputError, UnsupportedModelError

EXIT_USAGE = 2


def _engine(args: argparse.Namespace) -> Any:
    from chunkcache.config import Settings
    from chunkcache.engine import ChunkCacheEngine

    return ChunkCacheEngine(Settings.from_args(args))


def cmd_strategies(args: argparse.Namespace) -> int:
    from chunkcache.engine import describe_strategies
    from chunkcache.config import Settings
    from chunkcache.engine import STRATEGY_SETTINGS

    settings = Settings.from_args(args)
    print(describe_strategies({k: getattr(settings, k) for k in STRATEGY_SETTINGS}))
    print(f"\ndefault strategy (Settings.strategy): {settings.strategy}")
    return 0


def cmd_check_model(args: argparse.Namespace) -> int:
    from chunkcache.config import Settings
    from chunkcache.jobs.check_model import check_model, default_checks_dir

    settings = Settings.from_args(args, model=None)  # the model checked is the argument, not the setting
    checks_dir = Path(args.checks_dir).expanduser() if args.checks_dir else default_checks_dir()
    verdict = check_model(args.model, settings, checks_dir)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    elif verdict.status == "unsupported":
        raise UnsupportedModelError(verdict.reason)
    else:
        for measurement in verdict.measurements:
            print(measurement.line())
        print(verdict.summary())
        print(f"verdict kept in {checks_dir} ({verdict.fingerprint[:12]}): serve reuses it", file=sys.stderr)
    return {"pass": 0, "fail": 1}.get(verdict.status, EXIT_USAGE)


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
    from chunkcache.engine import make_strategy, parse_strategy_spec

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


def cmd_ingest(args: argparse.Namespace) -> int:
    from chunkcache.config import Settings
    from chunkcache.jobs.ingest import ingest

    if not args.paths and not args.delete:
        raise CliError("give files or folders to ingest, or --delete DOC_ID")
    settings = Settings.from_args(args)
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

            settings = Settings.from_args(args)
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
    if s.context_tokens:
        print(f"each computed behind its neighbours: {s.context_tokens} more tokens computed and dropped "
              f"({s.context_tokens / max(s.tokens, 1):.0%} of the chunks' own)")
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
    from chunkcache.retriever import ChunkIndex, SearchOptions

    index = ChunkIndex.load(args.index)
    try:
        engine = _engine(args)
        index.options = SearchOptions.from_settings(engine.settings, args.retrieval)
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
        found = ", ".join(f"{name} #{rank}" for name, rank in hit.ranks.items())
        print(f"  {hit.score:.3f}  {hit.doc_id}  {hit.chunk_id[:12]}  ({found})")
    t = result.timings
    print(f"\ntimings: retrieve {t['retrieve_s'] * 1e3:.0f} ms, load {t['load_s'] * 1e3:.0f} ms, "
          f"blend {t['blend_s'] * 1e3:.0f} ms, first token {t['ttft_s'] * 1e3:.0f} ms")
    return 0


def _persistent_store(args: argparse.Namespace) -> Any:
    """The configured store's persistent tiers (disk, remote): memory tiers live in one process."""
    from chunkcache.codec import get_codec
    from chunkcache.config import Settings
    from chunkcache.store import build_store

    settings = Settings.from_args(args)
    try:
        return build_store(settings, get_codec(settings.codec), persistent_only=True)
    except InvalidInputError as exc:
        raise CliError(str(exc)) from None


def _variant_stats(args: argparse.Namespace) -> dict[str, Any] | None:
    """Cache-Craft's variants next to the store: counts and CCI quartiles (None when there are none)."""
    from chunkcache.config import Settings
    from chunkcache.store.policy import quantile
    from chunkcache.store.variants import VariantIndex

    settings = Settings.from_args(args)
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


STRATEGY_HELP = ("fusion strategy spec NAME[:VALUE][:KEY=VALUE...], e.g. cacheblend:0.15:spread_v=0.5 "
                 "(default: settings; `chunkcache strategies` lists names and parameters)")


def build_parser() -> argparse.ArgumentParser:
    from chunkcache.engine import PACKAGED_MODELS
    from chunkcache.store import PERSISTENT_TIERS

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
        p.set_defaults(make_engine=_engine)  # commands defined elsewhere (eval/cli.py) build engines the same way

    p = sub.add_parser("strategies", help="every fusion strategy, its parameters and their defaults, and the spec syntax")
    p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG): its defaults are shown")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("check-model", help="can chunkcache fuse this model? its architecture and RoPE mode, then in float32 "
                       "its logits vs the Hugging Face forward, re-rotated keys, cacheblend:1.0 vs full prefill "
                       "(exit 0 pass, 1 fail, 2 unsupported)")
    p.add_argument("model", metavar="PATH_OR_NAME",
                   help=f"packaged model ({', '.join(PACKAGED_MODELS)}) or a local Hugging Face folder")
    p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG): models_dir, device, prompt, primer")
    p.add_argument("--checks-dir", help="where verdicts are kept per model fingerprint, for serve "
                   "(default ~/.cache/chunkcache/checks)")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.set_defaults(func=cmd_check_model)

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

    from chunkcache.eval.cli import add_bench_parsers, add_eval_parser

    add_eval_parser(sub, common)
    add_bench_parsers(sub, common)

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
    p.add_argument("--bare-every", type=int, default=0,
                   help="also time a bare prefill loop on every Nth batch and report precompute's share of its "
                        "speed (default 0: never; it costs that batch's compute again)")
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
    p.add_argument("--retrieval", choices=("dense", "lexical", "hybrid"), default=None,
                   help="faiss embeddings, BM25 words, or both rank-fused (setting retrieval, default hybrid)")
    p.add_argument("--strategy", default=None, help=STRATEGY_HELP)
    p.add_argument("--recompute-ratio", type=float, default=None,
                   help="share of tokens to recompute (cacheblend, cachecraft); overrides the spec's")
    p.add_argument("--json", action="store_true",
                   help="print answer, sources (with the retrievers that found each) and timings as one JSON object")
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
            p.add_argument("--tier", choices=PERSISTENT_TIERS, help="only this tier")
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
