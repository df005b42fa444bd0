"""Prompts for the fused path on the emulated GPU (`tests/fake_cuda.py`): a tiny random Llama whose
weights live on the emulated device, prompts of chosen shapes with their stored caches, and those
caches as each tier hands them to the fusion."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chunkcache.blend.prefill import prefill_chunks, prefill_head
from chunkcache.codec import get_codec
from chunkcache.codec.base import DeviceLayer
from chunkcache.kv import ChunkKV
from chunkcache.model.executor import LayerExecutor
from chunkcache.model.prompt import PromptPieces
from chunkcache.store.stream import LayerStream
from tests.fake_cuda import FakeCuda


@dataclass
class Prompt:
    executor: LayerExecutor
    pieces: PromptPieces
    head: ChunkKV
    chunks: list[ChunkKV]
    fake: FakeCuda


def emulated_prompts(dtype: torch.dtype, layers: int, shapes: Mapping[Hashable, tuple[Sequence[int], int]],
                     **config: Any) -> dict[Hashable, Prompt]:
    """A tiny random Llama in ``dtype`` (its own: the emulation tags its weights) and, per name, a
    prompt of the given chunk lengths and question length behind a 12-token head, its chunks'
    caches computed behind the head and a 7-token primer. The model is then on the emulated GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=False, **config)
    torch.manual_seed(0)
    executor = LayerExecutor(AutoModelForCausalLM.from_config(model_config, dtype=dtype).eval())
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 256, (n,), generator=gen).tolist())

    head, primer = ids(12), ids(7)
    head_kv = prefill_head(executor, head, "fp")
    prefix = prefill_head(executor, head + primer, "fp")
    fake = FakeCuda()
    out = {}
    for name, (chunk_sizes, question) in shapes.items():
        pieces = PromptPieces(head, tuple(ids(n) for n in chunk_sizes), ids(question))
        out[name] = Prompt(executor, pieces, head_kv, prefill_chunks(executor, prefix, list(pieces.chunks), "p"), fake)
    with fake.active():
        fake.executor_on_device(executor)
        executor.use_attention_backend("sdpa")
    return out


def tier_sources(p: Prompt, where: str) -> tuple[ChunkKV, tuple[Any, ...]]:
    """The head's and chunks' caches as the GPU tier serves them (``gpu``: device tensors), as the
    CPU tier and host decoding do (``host``: pinned host memory, the chunks streamed layer by
    layer), or as a disk tier hands them to a GPU (``disk:<codec>``: encoded layers in pinned
    memory). Call it inside the emulation."""
    if where == "gpu":
        return (ChunkKV(p.fake.put(p.head.kv.clone()), p.head.token_ids, 0, "fp", ""),
                tuple(ChunkKV(p.fake.put(c.kv.clone()), c.token_ids, c.position_offset, "fp", "p") for c in p.chunks))
    streams = []
    codec = get_codec(where.removeprefix("disk:")) if where.startswith("disk:") else None
    for c in p.chunks:
        stream = LayerStream("k")
        stream.start(c.num_layers, c.token_ids, c.position_offset, "fp", "p")
        if codec is not None:  # the disk tier's bytes, decoded by the device as fusion reaches them
            entry = codec.open(codec.encode(c))
            for i in range(c.num_layers):
                stream.push(DeviceLayer(codec, entry, i, codec.unpack_layer(entry, i)))
        else:
            for layer in c.kv.unbind(0):
                stream.push(p.fake.pinned_host(layer))
        streams.append(stream)
    return ChunkKV(p.fake.pinned_host(p.head.kv), p.head.token_ids, 0, "fp", ""), tuple(streams)
