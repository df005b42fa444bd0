"""`VariantIndex`: variants per chunk, capped, the least reused dropped first, kept across reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkcache.errors import InvalidInputError
from chunkcache.store.variants import VariantIndex, VariantMeta, variant_key


def _meta(chunk: str, preceding: tuple[str, ...], cci: float = 0.7) -> VariantMeta:
    return VariantMeta(variant_key(chunk, preceding), chunk, preceding, tuple(0.1 for _ in preceding), cci,
                       (0.2, 0.4, 0.1))


def test_variants_are_capped_and_the_most_reused_survive(tmp_path: Path) -> None:
    index = VariantIndex(tmp_path / "v", limit=2)
    a, b, c = _meta("k", ("x",)), _meta("k", ("y",)), _meta("k", ("x", "y"))
    assert len({a.key, b.key, c.key}) == 3 and a.key != variant_key("k", ("y",))
    assert index.add(a) == [] and index.add(b) == []
    index.hit("k", b.key)
    index.hit("k", b.key)
    assert index.add(c) == [a.key]  # a was never reused
    assert {v.key for v in index.variants("k")} == {b.key, c.key}
    assert index.add(_meta("k", ("y",), cci=0.9)) == []  # refreshing b keeps its hits
    refreshed = next(v for v in index.variants("k") if v.key == b.key)
    assert (refreshed.hits, refreshed.cci) == (2, 0.9)
    assert index.variants("other") == []
    index.close()
    again = VariantIndex(tmp_path / "v", limit=2)
    stats = again.stats()
    assert (stats["chunks"], stats["variants"]) == (1, 2) and stats["cci"] == [0.7, 0.9]
    again.close()


def test_bad_variants_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="one attention weight"):
        VariantMeta("v", "k", ("x", "y"), (0.1,), 0.5, ())
    with pytest.raises(InvalidInputError, match="at least 1"):
        VariantIndex(tmp_path / "v", limit=0)
