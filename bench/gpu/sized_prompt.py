"""Device check helper: an engine on a model, and one prompt of the bundled passages cut to a
given size in a given number of chunks, its chunk caches precomputed (the profile and probe steps)."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import Example, load_examples
from chunkcache.eval.ttft import sweep_examples


def engine_with_prompt(model: str, dtype: str, store: str, tokens: int, chunks: int
                       ) -> tuple[ChunkCacheEngine, Example]:
    engine = ChunkCacheEngine(Settings.load(None, model=model, dtype=dtype, store_path=store))
    tokenizer = engine.model.tokenizer
    examples = load_examples(Path(str(resources.files("chunkcache").joinpath("data/demo.json"))), None, None)
    (example,) = sweep_examples(
        examples, tokens, chunks, lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
        lambda t, n: tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)[:n]))
    engine.precompute(list(example.chunks))
    return engine, example


def prompt_arguments(doc: str, strategies: str) -> argparse.ArgumentParser:
    """The options both steps share: the model, its dtype, the prompt's size and the strategies."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--strategies", default=strategies)
    return parser
