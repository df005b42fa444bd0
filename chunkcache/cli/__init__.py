"""The ``chunkcache`` command: one subcommand per use, each module of this package adding its
own (`answer`: answer, query, demo, strategies, check-model; `corpus`: ingest, precompute;
`cache`; `serve`: serve and the service benches; `evaluate`: eval and the other benches).
Every command loads its settings one way (`chunkcache.config.Settings.from_args`);
``chunkcache --help`` lists them."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from chunkcache.cli import answer, cache, corpus, evaluate, serve
from chunkcache.cli.common import add_common
from chunkcache.errors import ChunkCacheError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkcache",
        description="Answer questions over retrieved chunks by fusing their precomputed KV caches.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for part in (answer, serve, evaluate, corpus, cache):
        part.add_parsers(sub, add_common)
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
