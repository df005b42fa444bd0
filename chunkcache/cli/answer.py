"""The commands that answer: `answer` (chunks given in a file), `query` (retrieved from an
index), the `demo`, and the two that say what can be used: `strategies` and `check-model`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chunkcache.cli.common import CommonArgs, engine_from_args
from chunkcache.errors import CliError, UnsupportedModelError

EXIT_FAIL = 1
EXIT_UNSUPPORTED = 2  # check-model: the model cannot be fused (as usage errors exit)
STRATEGY_HELP = ("fusion strategy spec NAME[:VALUE][:KEY=VALUE...], e.g. cacheblend:0.15:spread_v=0.5 "
                 "(default: settings; `chunkcache strategies` lists names and parameters)")


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
    return {"pass": 0, "fail": EXIT_FAIL}.get(verdict.status, EXIT_UNSUPPORTED)


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
    engine = engine_from_args(args)
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

    engine = engine_from_args(args)
    index_dir = Path(args.index) if args.index else engine.settings.store_path.parent / "demo-index"
    run_demo(engine, index_dir, args.limit, args.recompute_ratio, args.max_new_tokens)
    engine.close()
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from chunkcache.pipeline import RAGPipeline
    from chunkcache.retriever import ChunkIndex, SearchOptions

    index = ChunkIndex.load(args.index)
    try:
        engine = engine_from_args(args)
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


def add_parsers(sub: argparse._SubParsersAction, common: CommonArgs) -> None:  # type: ignore[type-arg]
    from chunkcache.engine import PACKAGED_MODELS

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
