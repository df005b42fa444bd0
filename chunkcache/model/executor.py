"""The per-layer executor that blend drives: embeddings, q/k/v, RoPE, attention over a fused KV
cache for any subset of positions, MLP, final norm and logits. It uses the Hugging Face modules'
weights but not their ``forward`` signatures, which change between transformers releases.

The tokens a pass computes travel as `Rows`: sequence indices and positions already on the
model's device, with their rotary tables made once. Layer after layer nothing is moved to the
device and nothing is read back, so on a GPU the host queues the whole pass without waiting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from chunkcache.errors import InvalidInputError
from chunkcache.model.arch import check_supported
from chunkcache.model import sparse_attention
from chunkcache.model.decode_attention import DecodeTable, decode_attention
from chunkcache.model.attention import (
    SPARSE_BACKENDS, ApeAttention, ape_attention, blocked_attention, device_sparse_attention, masked_attention,
    plain_attention, plain_is_fast,
)

__all__ = ["ApeAttention", "DecodeSlot", "KVHook", "LayerExecutor", "QueryHook", "Rows", "rotate", "rotate_half"]


@dataclass(frozen=True)
class Rows:
    """The tokens one pass computes: their sequence indices and RoPE positions (int64, on the
    model's device), the rotary tables of those positions (model dtype, attention scaling
    applied), and ``span`` when the host knows the rows are exactly that contiguous range."""

    index: torch.Tensor  # [n]
    positions: torch.Tensor  # [n]
    cos: torch.Tensor  # [n, head_dim]
    sin: torch.Tensor
    span: range | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, keep: torch.Tensor) -> "Rows":
        """The rows at ``keep`` (a device index into these rows). Gathered tables equal tables
        made for the gathered positions, to the bit (every step is elementwise)."""
        return Rows(self.index[keep], self.positions[keep], self.cos[keep], self.sin[keep])

    def first(self, n: int) -> "Rows":
        """The first ``n`` rows (views)."""
        span = range(self.span.start, self.span.start + n) if self.span is not None else None
        return Rows(self.index[:n], self.positions[:n], self.cos[:n], self.sin[:n], span)


@dataclass(frozen=True)
class DecodeSlot:
    """Where one decoded token of a batch goes: its sequence's cache buffer
    [layers, 2, kv_heads, capacity, head_dim], the index it is written at (it then attends over
    every index up to it) and that sequence's APE attention, if any."""

    kv: torch.Tensor
    at: int
    ape: ApeAttention | None = None


class KVHook(Protocol):
    """Sees a layer's fresh K/V [kv_heads, n, d] of ``rows`` and that layer's cache [kv_heads, N, d]
    before they are written to it (it may change the cache in place)."""

    def __call__(self, rows: Rows, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> None: ...


class QueryHook(Protocol):
    """Sees a layer's rotated queries [heads, n, d] and its cache's keys [kv_heads, N, d] once the
    rows' own keys are written."""

    def __call__(self, q: torch.Tensor, keys: torch.Tensor) -> None: ...


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

    def __init__(self, model: torch.nn.Module, sparse_backend: str = "auto") -> None:
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
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.sparse_backend = "auto"
        self.use_attention_backend(sparse_backend)

    def use_attention_backend(self, name: str) -> None:
        """How a selection of queries attends on a GPU (``Settings.attention_backend``)."""
        if name not in SPARSE_BACKENDS:
            raise InvalidInputError(f"attention_backend must be one of {', '.join(SPARSE_BACKENDS)}, got {name!r}")
        if name == "triton" and not sparse_attention.triton_available():
            raise InvalidInputError("attention_backend 'triton' needs the triton package (it comes with PyTorch's "
                                    "CUDA builds); install it or use 'auto'")
        self.sparse_backend = name

    # --- RoPE -------------------------------------------------------------------------------
    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary angles [tokens, head_dim] of ``positions``, in float64. fp64: at position 4K an
        fp32 angle is already off by ~2e-4 rad, which would dominate the error of re-rotated keys."""
        freqs = positions.to(self.device, torch.float64)[:, None] * self._inv_freq64[None, :]
        return torch.cat((freqs, freqs), dim=-1)

    def rows(self, index: torch.Tensor, positions: torch.Tensor | None = None, span: range | None = None) -> Rows:
        """`Rows` of sequence ``index`` at ``positions`` (default: the indices), both on the
        model's device; ``span`` when they are exactly that contiguous range."""
        positions = index if positions is None else positions
        emb = self._angles(positions)
        scaling = self.attention_scaling
        return Rows(index, positions, (emb.cos() * scaling).to(self.dtype), (emb.sin() * scaling).to(self.dtype), span)

    def span_rows(self, span: range, positions: torch.Tensor | None = None) -> Rows:
        """`Rows` of the contiguous indices ``span`` (made on the device: nothing is copied)."""
        index = torch.arange(span.start, span.stop, device=self.device)
        return self.rows(index, index if positions is None else positions, span)

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
        the attention scaling: the tables of `rotate`, made once by callers that turn at the same
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

    def _projected(self, layer: int, hidden: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(hidden)
        n = hidden.shape[0]
        heads = {"q_proj": self.num_heads, "k_proj": self.num_kv_heads, "v_proj": self.num_kv_heads}
        return [getattr(attn, name)(x).view(n, heads[name], self.head_dim).transpose(0, 1) for name in names]

    @torch.inference_mode()
    def qkv(self, layer: int, hidden: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [heads, n, d], k and v [kv_heads, n, d] of ``hidden`` [n, hidden] at ``layer``."""
        q, k, v = self._projected(layer, hidden, ("q_proj", "k_proj", "v_proj"))
        cos, sin = rows.cos, rows.sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    @torch.inference_mode()
    def kv(self, layer: int, hidden: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """`qkv` without the queries (what a deviation check needs)."""
        k, v = self._projected(layer, hidden, ("k_proj", "v_proj"))
        return k * rows.cos + rotate_half(k) * rows.sin, v

    @torch.inference_mode()
    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        rows: Rows,
        keys: torch.Tensor,
        values: torch.Tensor,
        ape: ApeAttention | None = None,
        before_write: KVHook | None = None,
        on_query: QueryHook | None = None,
    ) -> torch.Tensor:
        """Compute ``layer`` for ``rows`` (sorted by sequence index) whose inputs are ``hidden``.

        Their fresh K/V are written into ``keys``/``values`` ([kv_heads, N, d], the layer's fused
        cache, modified in place); the queries then attend causally over all N cached tokens.
        ``before_write`` sees the fresh K/V and the cache just before they are written;
        ``on_query`` sees the queries and the keys once they are."""
        q, k, v = self.qkv(layer, hidden, rows)
        if before_write is not None:
            before_write(rows, k, v, keys, values)
        if rows.span is not None:
            keys[:, rows.span.start : rows.span.stop] = k
            values[:, rows.span.start : rows.span.stop] = v
        else:
            keys[:, rows.index] = k
            values[:, rows.index] = v
        if on_query is not None:
            on_query(q, keys)
        return self._rest(layer, hidden, self._attend(q, keys, values, rows, ape))

    @torch.inference_mode()
    def decode_layer(self, layer: int, hidden: torch.Tensor, rows: Rows, slots: list[DecodeSlot]) -> torch.Tensor:
        """``layer`` for one new token of each of B sequences (``hidden`` [B, hidden], ``rows`` their
        B positions): projections and MLP over the batch at once; each token's K/V written into its
        own cache at ``slot.at`` and its query attending over that cache up to there. A sequence's
        result equals `run_layer` on it alone, up to the float rounding of batched matrix kernels."""
        q, k, v = self.qkv(layer, hidden, rows)
        outs = []
        for i, slot in enumerate(slots):
            keys, values = slot.kv[layer, 0, :, : slot.at + 1], slot.kv[layer, 1, :, : slot.at + 1]
            keys[:, slot.at] = k[:, i]
            values[:, slot.at] = v[:, i]
            one = Rows(rows.index[i : i + 1], rows.positions[i : i + 1], rows.cos[i : i + 1], rows.sin[i : i + 1],
                       range(slot.at, slot.at + 1))
            outs.append(self._attend(q[:, i : i + 1], keys, values, one, slot.ape))
        return self._rest(layer, hidden, torch.cat(outs) if len(outs) > 1 else outs[0])

    @torch.inference_mode()
    def decode_table_layer(self, layer: int, hidden: torch.Tensor, rows: Rows, table: DecodeTable) -> torch.Tensor:
        """`decode_layer` with one attention call for the whole batch: each token's K/V written into
        the buffer ``table`` names for it and its query attending over that buffer, all on the
        device (`chunkcache.model.decode_attention`): nothing the host must know per sequence."""
        q, k, v = self.qkv(layer, hidden, rows)
        return self._rest(layer, hidden, decode_attention(q, k, v, table, layer, self.scale))

    def _rest(self, layer: int, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer after attention: output projection, residual, MLP, residual."""
        block = self.layers[layer]
        hidden = hidden + block.self_attn.o_proj(attended)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    @torch.inference_mode()
    def run_layer_batch(
        self,
        layer: int,
        hidden: torch.Tensor,
        rows: Rows,
        lengths: list[int],
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute ``layer`` for B right-padded sequences (``hidden`` [B, L, hidden], real lengths
        ``lengths``) that all follow the same prefix (``prefix_k``/``prefix_v`` [kv_heads, P, d]);
        ``rows`` hold the B x L rows' positions (each sequence's L positions in turn). Returns the
        new hidden states and each sequence's fresh K and V [B, kv_heads, L, d] (padding rows hold
        garbage).

        Projections and MLP run on the whole batch; attention runs per sequence over exactly its
        own keys (no padding enters a softmax). A sequence's result depends on its batch only
        through float rounding (matrix kernels may change with the batch's size)."""
        b, length, width = hidden.shape
        q, k, v = self.qkv(layer, hidden.reshape(b * length, width), rows)
        out = q.new_zeros(b * length, self.num_heads * self.head_dim)
        prefix = prefix_k.shape[1]
        for i, n in enumerate(lengths):
            at = slice(i * length, i * length + n)
            keys = torch.cat((prefix_k, k[:, at]), dim=1)
            values = torch.cat((prefix_v, v[:, at]), dim=1)
            mask = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device)
            mask[:, prefix:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            attended = masked_attention(q[:, at], keys, values, mask, self.scale)
            out[at] = attended.transpose(0, 1).reshape(n, -1)
        flat = self._rest(layer, hidden.reshape(b * length, width), out)
        split = (self.num_kv_heads, b, length, self.head_dim)
        return (flat.view(b, length, width), k.view(split).transpose(0, 1), v.view(split).transpose(0, 1))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: Rows,
                ape: ApeAttention | None) -> torch.Tensor:
        """Attention of ``rows``' queries, ``[n, heads * head_dim]`` (see `chunkcache.model.attention`)."""
        n, total = q.shape[1], keys.shape[1]
        if ape is not None:
            out = ape_attention(q, keys, values, rows.index, ape, self.scale)
        elif q.device.type == "cpu":
            # the index is host memory here: reading it decides the cheapest exact call
            if n == total:
                out = plain_attention(q, keys, values, self.scale, causal=n > 1)
            elif n == 1 and int(rows.index[0]) == total - 1:
                out = plain_attention(q, keys, values, self.scale, causal=False)
            else:
                out = blocked_attention(q, keys, values, rows.index, self.scale)
        elif (rows.span is not None and rows.span.stop == total and (rows.span.start == 0 or n == 1)
              and plain_is_fast(q, keys)):
            # a prefill of every position, or one query after every key: known without a read
            out = plain_attention(q, keys, values, self.scale, causal=n > 1)
        else:
            return device_sparse_attention(q, keys, values, rows.index, self.scale, self.sparse_backend)
        return out.transpose(0, 1).reshape(n, self.num_heads * self.head_dim)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) for hidden states [n, hidden]."""
        return self.lm_head(self.norm(hidden)).to(torch.float32)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes a cache buffer of ``tokens`` tokens takes (every layer's K and V)."""
        return (self.num_layers * 2 * self.num_kv_heads * self.head_dim * tokens
                * torch.empty((), dtype=self.dtype).element_size())

    def empty_kv(self, tokens: int) -> torch.Tensor:
        """A zeroed cache buffer of shape [layers, 2, kv_heads, tokens, head_dim]."""
        return torch.zeros(
            self.num_layers, 2, self.num_kv_heads, tokens, self.head_dim,
            dtype=self.dtype, device=self.device,
        )
