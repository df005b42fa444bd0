"""Shared input of the fusion tests: one demo question over three shortened passages, with the
head's and chunks' caches computed on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkcache.blend import FusionInput
from chunkcache.blend.prefill import prefill_chunk, prefill_head
from chunkcache.model import LoadedModel

DATA = Path(__file__).resolve().parents[2] / "chunkcache" / "data" / "demo.json"


@pytest.fixture(scope="module")
def fusion_input(smollm2: LoadedModel) -> FusionInput:
    example = json.loads(DATA.read_text())["examples"][0]
    # three shortened passages keep the tests quick while chunks still attend across each other
    chunks = [" ".join(c.split()[:90]) for c in example["chunks"][:3]]
    pieces = smollm2.template.pieces(example["question"], chunks)
    head = prefill_head(smollm2.executor, pieces.head, smollm2.fingerprint)
    kvs = tuple(prefill_chunk(smollm2.executor, head, ids, "prefix") for ids in pieces.chunks)
    return FusionInput(pieces, head, kvs, max_new_tokens=12)
