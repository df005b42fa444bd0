"""Shared fixtures: the real SmolLM2 model (converted once into the user cache), tiny
random-weight models of each supported family that reuse its tokenizer, the packaged MiniLM
embedder, and a real redis-server and Mooncake Store for the remote tier."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from chunkcache.config import Settings  # noqa: E402
from chunkcache.eval.services import RedisServer, free_port  # noqa: E402,F401  (tests import them from here)
from chunkcache.model import LoadedModel, load_model  # noqa: E402
from chunkcache.model.registry import converted_dir  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer the question briefly, using only the passages."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return Settings.load(env={}).models_dir


@pytest.fixture(scope="session")
def smollm2(models_dir: Path) -> LoadedModel:
    torch.manual_seed(0)
    return load_model("smollm2-135m", models_dir, "float32", "cpu", SYSTEM)


def make_tiny_model(family: str, dest: Path, models_dir: Path, **overrides) -> Path:
    """Save a random-weight model of ``family`` with SmolLM2's tokenizer into ``dest``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    if family == "mistral":
        base["sliding_window"] = None
    base.update(overrides)
    config = AutoConfig.for_model(family, **base)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make qkv biases (Qwen2) non-zero so they are exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(dest)
    source = converted_dir("smollm2-135m", models_dir)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f, models_dir) for f in ("llama", "mistral", "qwen2")}


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def embedder():  # type: ignore[no-untyped-def]
    """The real packaged MiniLM embedder (retriever and recall tests)."""
    from chunkcache.retriever import MiniLMEmbedder

    return MiniLMEmbedder()


@pytest.fixture(scope="session")
def minilm_tokenizer():  # type: ignore[no-untyped-def]
    """MiniLM's (real, fast) tokenizer: chunking tests count tokens with it."""
    from transformers import AutoTokenizer

    from chunkcache.retriever import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


# --- a real redis-server for the remote tier: the one CI started ($CHUNKCACHE_TEST_REDIS_URL), or one
# started here on a free loopback port when the binary is installed.
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI runs these tests")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The CI's server when it started one, else this session's; emptied for each test."""
    import redis

    url = os.environ.get("CHUNKCACHE_TEST_REDIS_URL") or redis_server.url
    if url == redis_server.url and redis_server.proc is None:
        redis_server.start()
    redis.Redis.from_url(url).flushdb()
    yield url


# --- a real Mooncake Store (master + segment holder) for the remote tier's second backend
@pytest.fixture(scope="session")
def mooncake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from chunkcache.eval.services import MooncakeServer, mooncake_binary

    try:
        import mooncake.store  # noqa: F401 - the wheel, and libibverbs1 it links against
        missing = None if mooncake_binary("mooncake_master") else "mooncake_master is not on PATH"
    except ImportError as exc:  # the wheel, or the system's libibverbs1 it links against
        missing = f"Mooncake's client does not import ({exc})"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; .ci/run installs libibverbs1 and scripts/test.sh the mooncake extra")
        pytest.skip(f"{missing}: pip install -e '.[mooncake]' and apt-get install libibverbs1; CI runs these tests")
    server = MooncakeServer(tmp_path_factory.mktemp("mooncake"))
    server.start()
    yield server
    server.close()
