"""`CraftVariants`: the engine's side of Cache-Craft. Records each chunk's KV as computed in a full
prefill (with its attention profile) as a variant, and for a `cachecraft` request plans every
chunk: which variant to load, which tokens to recompute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from chunkcache.blend.cachecraft import INDEPENDENT, ChunkPlan, plan_chunk
from chunkcache.blend.craft_profile import ChunkProfile
from chunkcache.kv import ChunkKV
from chunkcache.store.variants import VariantIndex, VariantMeta, variant_key


class CraftVariants:
    def __init__(self, store: Any, index: VariantIndex, codec: Any, model_fingerprint: str,
                 device: torch.device | str) -> None:
        self.store, self.index, self.codec = store, index, codec
        self.fingerprint, self.device = model_fingerprint, device

    def plans(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]], alpha: float
              ) -> tuple[list[ChunkKV | None], list[ChunkPlan]]:
        """Per chunk: the variant's KV (None: use the independent cache) and its plan."""
        kvs: list[ChunkKV | None] = []
        plans = []
        for i, (key, ids) in enumerate(zip(keys, chunks)):
            variants = self.index.variants(key)
            available = [v.key for v in variants if self.store.contains(v.key)]
            plan = plan_chunk(keys[:i], len(ids), variants, alpha, available)
            kv = None
            if plan.variant != INDEPENDENT:
                kv = self.store.get(plan.variant, self.fingerprint, self.device)
                if kv is None or kv.token_ids != tuple(ids):  # gone since: plan without it
                    plan = plan_chunk(keys[:i], len(ids), variants, alpha, [k for k in available if k != plan.variant])
                    kv = None
                else:
                    self.index.hit(key, plan.variant)
            kvs.append(kv)
            plans.append(plan)
        return kvs, plans

    def record(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]], starts: Sequence[int],
               fused: torch.Tensor, profiles: Sequence[ChunkProfile], prefix_fingerprint: str) -> None:
        """Store every chunk's KV from a full prefill's ``fused`` buffer as a variant."""
        for i, (key, ids, start, profile) in enumerate(zip(keys, chunks, starts, profiles)):
            preceding = tuple(keys[:i])
            name = variant_key(key, preceding)
            kv = ChunkKV(fused[:, :, :, start : start + len(ids)].clone(), tuple(ids), start, self.fingerprint,
                         prefix_fingerprint)
            self.store.put(name, kv, self.codec)
            scores = (profile.token_inter / len(profile.inter)).tolist() if profile.token_inter is not None else []
            meta = VariantMeta(name, key, preceding, tuple(profile.preceding_weights()), profile.cci, tuple(scores))
            for dropped in self.index.add(meta):
                self.store.delete(dropped)
