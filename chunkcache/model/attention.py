"""Attention over a fused cache, one call per layer, chosen by what the host knows of the queries.

- Every position a query (a prefill): causal attention.
- One query at the end (decoding): plain attention over every key.
- Any other set of queries (sorted sequence indices; CacheBlend's selection, the question):
  on the CPU, blocks of queries each over the keys up to its last index (the index is host
  memory there, reading it costs nothing); on CUDA one call that never reads the index on the
  host: `sparse_query_attention` (a Triton kernel that skips fully masked key blocks) or, without
  Triton, one masked call of the memory-efficient kernel.
- APE's tempered attention, in fp32, without boolean-mask indexing (a `nonzero` on a GPU).

On CUDA the backends are pinned: cuDNN's attention builds an execution plan for every new shape
(about 20 ms each, cold, on an H200) and requests meet new shapes with every prompt and every
choice of recomputed tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chunkcache.model import sparse_attention

_ATTENTION_BLOCKS = 8
_MIN_BLOCK_QUERIES = 32
# masked calls: the memory-efficient kernel first (flash takes no mask on CUDA)
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
# unmasked calls (a full prefill, one decoded token): flash first, never cuDNN
PLAIN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SPARSE_BACKENDS = ("auto", "triton", "sdpa")


@dataclass(frozen=True)
class ApeAttention:
    """APE's attention change for queries after the parallel-encoded context: context logits are
    divided by ``temperature`` and their weights multiplied by ``scale`` before normalising."""

    context_mask: torch.Tensor  # bool [keys], on the model's device: True where the key is a chunk token
    temperature: float = 0.9
    scale: float = 0.9


def folded_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """Masked attention of ``q`` [heads, n, d] over ``keys``/``values`` [kv_heads, S, d] (``mask``
    [n, S], True: visible) with the heads that share a KV head folded into the query length (heads
    are grouped KV-head-major, as in ``repeat_kv``), restricted to ``MASKED_BACKENDS``: the
    memory-efficient backend has no grouped-query support and would otherwise fall back to math,
    which materialises every head's keys."""
    heads, n, d = q.shape
    group = heads // keys.shape[0]
    folded = q.reshape(keys.shape[0], group * n, d)
    if group > 1:
        mask = mask.repeat(group, 1)
    with sdpa_kernel(MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(folded[None], keys[None], values[None], attn_mask=mask, scale=scale)[0]
    return out.reshape(heads, n, d)


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """Queries ``q`` [heads, n, d] over ``keys``/``values`` [kv_heads, S, d] where ``mask`` [n, S] is
    True. On CUDA through `folded_attention`; the CPU's flash kernel supports grouped queries
    itself (folding only costs it time)."""
    if q.device.type == "cuda":
        return folded_attention(q, keys, values, mask, scale)
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[0] != keys.shape[0])[0]


def plain_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool
                    ) -> torch.Tensor:
    """Unmasked attention (causal for a prefill of every position), ``[heads, n, d]``."""
    with sdpa_kernel(PLAIN_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[0] != keys.shape[0])[0]


def plain_is_fast(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `plain_attention` on CUDA reaches a fused kernel: grouped-query fp32 does not (flash
    takes no fp32, the memory-efficient kernel no grouped queries in torch 2.11), and the math
    fallback holds every score at once (about 128 GiB at 32K tokens)."""
    return not (q.dtype == torch.float32 and q.shape[0] != keys.shape[0])


def blocked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float
                      ) -> torch.Tensor:
    """Sparse queries on the CPU: up to ``_ATTENTION_BLOCKS`` blocks of queries, each over the keys
    up to its largest index only, so causality saves work as it does in a full prefill (sorted
    indices save most; a fixed-shape fusion's are sorted within its segments). Reads the (host)
    index: never call it with device tensors."""
    n = q.shape[1]
    blocks = max(1, min(_ATTENTION_BLOCKS, n // _MIN_BLOCK_QUERIES))
    parts = []
    for block in torch.tensor_split(torch.arange(n), blocks):
        start, stop = int(block[0]), int(block[-1]) + 1
        upto = int(index[start:stop].max()) + 1  # the last, when sorted
        mask = torch.arange(upto)[None, :] <= index[start:stop, None]
        parts.append(masked_attention(q[:, start:stop], keys[:, :upto], values[:, :upto], mask, scale))
    return torch.cat(parts, dim=1)


def device_sparse_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                            scale: float, backend: str) -> torch.Tensor:
    """Sparse queries on a device, one call, no host read of ``index``: ``[n, heads * d]``."""
    fits = sparse_attention.kernel_supports(q.shape[-1], q.dtype)
    if backend != "sdpa" and fits and sparse_attention.triton_available():
        return sparse_attention.sparse_query_attention(q, keys, values, index, scale)
    if backend == "triton":
        raise RuntimeError("attention_backend 'triton' needs the triton package and a head size that is a power "
                           f"of two from 16 to 256 (this model's: {q.shape[-1]}); use 'auto' or 'sdpa'")
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= index[:, None]
    out = masked_attention(q, keys, values, mask, scale)
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def ape_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                  ape: ApeAttention, scale: float) -> torch.Tensor:
    """APE's tempered attention in fp32, ``[heads, n, d]``: query heads grouped per KV head (no
    copy of the keys per head), the context's logits tempered with `torch.where`."""
    heads, n, d = q.shape
    kv_heads, total = keys.shape[0], keys.shape[1]
    grouped = q.float().reshape(kv_heads, -1, d)  # [kv_heads, group * n, d]
    scores = (grouped @ keys.float().transpose(-1, -2)).view(heads, n, total) * scale
    context = ape.context_mask[:total]
    scores = torch.where(context, scores / ape.temperature + math.log(ape.scale), scores)
    visible = torch.arange(total, device=q.device)[None, :] <= index[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = probs.view(kv_heads, -1, total) @ values.float()
    return out.view(heads, n, d).to(q.dtype)
