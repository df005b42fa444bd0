"""The commands that build a corpus: `ingest` (chunk, embed, index documents) and `precompute`
(every chunk cache of an index into the store)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chunkcache.cli.common import CommonArgs, engine_from_args
from chunkcache.errors import CliError


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
            engine = engine_from_args(args)
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


def add_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
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
