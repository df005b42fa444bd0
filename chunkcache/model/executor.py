"""The per-layer executor that blend drives: embeddings, q/k/v, RoPE, attention over a fused KV
cache for any subset of positions, MLP, final norm and logits. It uses the Hugging Face modules'
weights but not their ``forward`` signatures, which change between transformers releases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chunkcache.model.arch import check_supported

T = TypeVar("T")
_ATTENTION_BLOCKS = 8
_MIN_BLOCK_QUERIES = 32
# Backends for masked attention. cuDNN's is left out: it builds an execution plan for every new
# shape (about 20 ms each, cold, on an H200), and masked calls meet new shapes with every prompt,
# chunk length and choice of recomputed tokens. (On the CPU only flash and math exist.)
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ApeAttention:
    """APE's attention change for queries after the parallel-encoded context: context logits are
    divided by ``temperature`` and their weights multiplied by ``scale`` before normalising."""

    context_mask: torch.Tensor  # bool [keys]: True where the key is a parallel-encoded chunk token
    temperature: float = 0.9
    scale: float = 0.9


class KVHook(Protocol):
    """Sees a layer's fresh K/V [kv_heads, n, d] of the tokens at ``index`` and that layer's cache
    [kv_heads, N, d] before they are written to it (it may change the cache in place)."""

    def __call__(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None: ...


class KeepLast(Generic[T]):
    """The value made for the last key (a CPU tensor), made again only when an unequal key comes.
    A fused prefill passes the same positions and token index layer after layer; moving them to
    the device and working out what depends on them each layer made a GPU wait for the host
    several times a layer."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, T] | None = None  # one tuple: replaced in a single step

    def get(self, key: torch.Tensor, make: Callable[[], T]) -> T:
        if key.device.type != "cpu":
            return make()
        last = self._last
        if last is not None and last[0].dtype == key.dtype and last[0].shape == key.shape and torch.equal(last[0], key):
            return last[1]
        value = make()
        self._last = (key.clone(), value)  # a clone: callers may change their tensor later
        return value


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor], inverse: bool = False) -> torch.Tensor:
    """``x`` [..., tokens, head_dim] turned by the tables (cos, sin) of ``LayerExecutor.rotation``
    (or back, ``inverse``)."""
    cos, sin = rotation[0].to(x.dtype), rotation[1].to(x.dtype)
    return x * cos + rotate_half(x) * (-sin if inverse else sin)


class LayerExecutor:
    """Runs a Llama/Mistral/Qwen2 decoder one layer at a time over chosen token positions."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        check_supported(config)
        base = model.model
        self.config = config
        self.embed_tokens = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        )
        self.scale = self.head_dim**-0.5
        rotary = base.rotary_emb
        # The model's own table already carries linear / llama3 frequency scaling.
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32).clone()
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = param.device
        self._inv_freq64 = self.inv_freq.to(self.device, torch.float64)
        self._kept: dict[str, KeepLast[Any]] = {}
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)

    def on_device(self, index: torch.Tensor) -> torch.Tensor:
        """A CPU index tensor on the model's device (kept while the same index comes again)."""
        if self.device.type == "cpu":
            return index
        return self._kept.setdefault("index", KeepLast()).get(index, lambda: index.to(self.device))

    # --- RoPE -------------------------------------------------------------------------------
    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary angles [tokens, head_dim] of ``positions``, in float64."""
        freqs = positions.to(self.device, torch.float64)[:, None] * self._inv_freq64[None, :]
        return torch.cat((freqs, freqs), dim=-1)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp64 angles: at position 4K an fp32 angle is already off by ~2e-4 rad, which would
        # dominate the error of re-rotated keys.
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            emb = self._angles(positions)
            scaling = self.attention_scaling
            return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

        # tables made under inference mode cannot serve a caller outside it (autograd refuses them)
        name = f"rope {dtype} {torch.is_inference_mode_enabled()}"
        return self._kept.setdefault(name, KeepLast()).get(positions, make)

    def apply_rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape [..., tokens, head_dim] for ``positions`` [tokens]."""
        cos, sin = self._cos_sin(positions, x.dtype)
        return x * cos + rotate_half(x) * sin

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated for position p -> keys for p + delta (rotations compose; computed in fp32)."""
        if delta == 0:
            return keys
        angle = float(delta) * self._inv_freq64.to(keys.device)
        emb = torch.cat((angle, angle))
        k32 = keys.to(torch.float32)
        cos, sin = emb.cos().to(torch.float32), emb.sin().to(torch.float32)
        return (k32 * cos + rotate_half(k32) * sin).to(keys.dtype)

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, head_dim] (float32) of the rotary angles of ``positions``, without
        the attention scaling: the tables of ``turn``, made once by callers that turn at the same
        positions in every layer instead of recomputing fp64 angles each time."""
        emb = self._angles(positions)
        return emb.cos().float(), emb.sin().float()

    def turn(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``x`` [..., tokens, head_dim] rotated by the rotary angle of ``positions`` [tokens] (or
        back, ``inverse``), without the rotary table's attention scaling: a pure rotation."""
        return rotate(x, self.rotation(positions), inverse)

    # --- layers -----------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids.to(self.device))

    @torch.inference_mode()
    def qkv(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [heads, n, d], k and v [kv_heads, n, d] of ``hidden`` [n, hidden] at ``layer``."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        n = hidden.shape[0]
        q = attn.q_proj(x).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = self._cos_sin(positions, q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    @torch.inference_mode()
    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        index: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        ape: ApeAttention | None = None,
        before_write: KVHook | None = None,
    ) -> torch.Tensor:
        """Compute ``layer`` for the tokens at sequence ``index`` (sorted) whose inputs are ``hidden``.

        Their fresh K/V are written into ``keys``/``values`` ([kv_heads, N, d], the layer's fused
        cache, modified in place); the queries then attend causally over all N cached tokens.
        ``before_write`` sees the fresh K/V and the cache just before they are written."""
        q, k, v = self.qkv(layer, hidden, positions)
        if before_write is not None:
            before_write(index, k, v, keys, values)
        on_device = self.on_device(index)
        keys[:, on_device] = k
        values[:, on_device] = v
        out = self._attend(q, keys, values, index, ape)
        block = self.layers[layer]
        hidden = hidden + block.self_attn.o_proj(out)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def run_layer_batch(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        lengths: list[int],
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute ``layer`` for B right-padded sequences (``hidden`` [B, L, hidden], real lengths
        ``lengths``) that all follow the same prefix (``prefix_k``/``prefix_v`` [kv_heads, P, d])
        at ``positions`` [L]. Returns the new hidden states and each sequence's fresh K and V
        [B, kv_heads, L, d] (padding rows hold garbage).

        Projections and MLP run on the whole batch; attention runs per sequence over exactly its
        own keys (no padding enters a softmax). A sequence's result depends on its batch only
        through float rounding (matrix kernels may change with the batch's size)."""
        b, length, width = hidden.shape
        q, k, v = self.qkv(layer, hidden.reshape(b * length, width), positions.repeat(b))
        out = q.new_zeros(b * length, self.num_heads * self.head_dim)
        prefix = prefix_k.shape[1]
        for i, n in enumerate(lengths):
            rows = slice(i * length, i * length + n)
            keys = torch.cat((prefix_k, k[:, rows]), dim=1)
            values = torch.cat((prefix_v, v[:, rows]), dim=1)
            mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device)
            mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            attended = self.masked_attention(q[:, rows], keys, values, mask)
            out[rows] = attended.transpose(0, 1).reshape(n, -1)
        block = self.layers[layer]
        flat = hidden.reshape(b * length, width) + block.self_attn.o_proj(out)
        flat = flat + block.mlp(block.post_attention_layernorm(flat))
        split = (self.num_kv_heads, b, length, self.head_dim)
        return (flat.view(b, length, width), k.view(split).transpose(0, 1), v.view(split).transpose(0, 1))

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
        ape: ApeAttention | None,
    ) -> torch.Tensor:
        n, total = q.shape[1], keys.shape[1]
        if ape is not None:
            return self._attend_ape(q, keys, values, index, ape)
        gqa = self.num_heads != self.num_kv_heads
        if n == total or (n == 1 and int(index[0]) == total - 1):
            # every position is a query (index is 0..N-1), or one query at the end sees all keys
            out = F.scaled_dot_product_attention(
                q[None], keys[None], values[None], is_causal=n > 1, scale=self.scale, enable_gqa=gqa
            )[0]
        else:
            # Sparse queries: split them into blocks, each attending only to the keys up to its
            # last index, so causality saves work as it does in a full prefill.
            blocks = max(1, min(_ATTENTION_BLOCKS, n // _MIN_BLOCK_QUERIES))
            parts = []
            on_device = self.on_device(index)
            for block in torch.tensor_split(torch.arange(n), blocks):
                start, stop = int(block[0]), int(block[-1]) + 1
                upto = int(index[stop - 1]) + 1  # from the CPU index: no device sync
                mask = torch.arange(upto, device=q.device)[None, :] <= on_device[start:stop, None]
                parts.append(self.masked_attention(q[:, start:stop], keys[:, :upto], values[:, :upto], mask))
            out = torch.cat(parts, dim=1)
        return out.transpose(0, 1).reshape(n, self.num_heads * self.head_dim)

    def masked_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
                         ) -> torch.Tensor:
        """Queries ``q`` [heads, n, d] over ``keys``/``values`` [kv_heads, S, d] where ``mask``
        [n, S] is True. On CUDA through `folded_attention` and ``MASKED_BACKENDS``; the CPU's flash
        kernel supports grouped queries itself (folding only costs it time)."""
        if q.device.type == "cuda":
            return folded_attention(q, keys, values, mask, self.scale)
        return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.num_heads != self.num_kv_heads)[0]

    def _attend_ape(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, ape: ApeAttention
    ) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        k = keys.repeat_interleave(group, dim=0).to(torch.float32)
        v = values.repeat_interleave(group, dim=0).to(torch.float32)
        scores = (q.to(torch.float32) @ k.transpose(-1, -2)) * self.scale  # [heads, n, N]
        ctx = ape.context_mask[: keys.shape[1]].to(q.device)
        scores[..., ctx] = scores[..., ctx] / ape.temperature + math.log(ape.scale)
        visible = torch.arange(keys.shape[1], device=q.device)[None, :] <= self.on_device(index)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        n = q.shape[1]
        return out.to(q.dtype).transpose(0, 1).reshape(n, self.num_heads * self.head_dim)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) for hidden states [n, hidden]."""
        return self.lm_head(self.norm(hidden)).to(torch.float32)

    def empty_kv(self, tokens: int) -> torch.Tensor:
        """A zeroed cache buffer of shape [layers, 2, kv_heads, tokens, head_dim]."""
        return torch.zeros(
            self.num_layers, 2, self.num_kv_heads, tokens, self.head_dim,
            dtype=self.dtype, device=self.device,
        )
