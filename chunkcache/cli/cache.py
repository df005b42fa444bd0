"""`chunkcache cache stats|ls|evict|clear`: the configured store's persistent tiers (disk,
remote), inspected and managed from outside the server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from chunkcache.cli.common import CommonArgs
from chunkcache.errors import CliError, InvalidInputError


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
    from chunkcache.store.policy import parse_bytes

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
                for name, (count, policy) in store.shrink(parse_bytes(args.to_bytes) or 0, args.tier).items():
                    print(f"{name}: evicted {count} entries by {policy}")
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


def add_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    from chunkcache.store import PERSISTENT_TIERS

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
