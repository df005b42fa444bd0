"""Every codec round-trips within its stated bound, and no damaged or foreign entry decodes."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
import torch
import zstandard

from chunkcache.codec import BENCH_CODECS, CacheMismatchError, decode_entry, get_codec, read_header
from chunkcache.codec.base import MAGIC
from chunkcache.codec.cachegen import layer_bins
from chunkcache.errors import CorruptCacheError, InvalidInputError
from chunkcache.kv import ChunkKV


def _kv(layers: int = 4, heads: int = 2, tokens: int = 37, dim: int = 16, dtype: torch.dtype = torch.float32) -> ChunkKV:
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(layers, 2, heads, tokens, dim, generator=g)
    kv[:, 0, :, :, 3] *= 20  # an outlier key channel, as real keys have
    return ChunkKV(kv=kv.to(dtype), token_ids=tuple(range(tokens)), position_offset=9,
                   model_fingerprint="m" * 64, prefix_fingerprint="p" * 64)


@pytest.mark.parametrize("spec", [*BENCH_CODECS, "kivi2:group=8", "cachegen-2:delta=1:group=4"])
def test_round_trip_keeps_metadata_shape_and_dtype(spec: str) -> None:
    kv = _kv(dtype=torch.bfloat16)
    out = get_codec(spec).decode(get_codec(spec).encode(kv))
    assert out.kv.shape == kv.kv.shape and out.kv.dtype == torch.bfloat16
    assert (out.token_ids, out.position_offset) == (kv.token_ids, kv.position_offset)
    assert (out.model_fingerprint, out.prefix_fingerprint) == (kv.model_fingerprint, kv.prefix_fingerprint)


def test_raw_is_bit_exact() -> None:
    kv = _kv()
    assert torch.equal(get_codec("raw").decode(get_codec("raw").encode(kv)).kv, kv.kv)


def test_int8_error_is_at_most_half_a_scale_step() -> None:
    kv = _kv()
    out = get_codec("int8").decode(get_codec("int8").encode(kv)).kv
    k, v = kv.kv[:, 0], kv.kv[:, 1]
    k_step = k.abs().amax(dim=2, keepdim=True) / 127  # per (layer, head, channel)
    v_step = v.abs().amax(dim=3, keepdim=True) / 127  # per (layer, head, token)
    assert ((out[:, 0] - k).abs() <= k_step / 2 + 1e-6).all()
    assert ((out[:, 1] - v).abs() <= v_step / 2 + 1e-6).all()


def test_kivi2_error_is_at_most_half_a_group_step() -> None:
    kv = _kv(tokens=64, dim=32)
    out = get_codec("kivi2").decode(get_codec("kivi2").encode(kv)).kv
    k = kv.kv[:, 0].reshape(4, 2, 2, 32, 32)  # groups of 32 tokens per channel
    k_step = (k.amax(dim=3, keepdim=True) - k.amin(dim=3, keepdim=True)) / 3
    # bfloat16 minimum rounded down and step rounded up: the step grows by at most the rounding
    k_err = (out[:, 0].reshape(4, 2, 2, 32, 32) - k).abs()
    k_slack = 2**-6 * k.abs().amax(dim=3, keepdim=True) / 3
    assert (k_err <= (k_step + k_slack) / 2 * 1.01).all()
    v = kv.kv[:, 1]  # one group of 32 channels per token
    v_step = (v.amax(dim=3, keepdim=True) - v.amin(dim=3, keepdim=True)) / 3
    v_slack = 2**-6 * v.abs().amax(dim=3, keepdim=True) / 3
    assert ((out[:, 1] - v).abs() <= (v_step + v_slack) / 2 * 1.01).all()


def test_kivi2_bound_holds_for_a_group_far_from_zero() -> None:
    # a narrow range at a large offset: rounding the minimum up would cost a whole step
    x = torch.linspace(100.3, 100.33, 32).repeat(1, 1, 1, 1, 1).expand(1, 2, 1, 32, 32).clone()
    kv = ChunkKV(x, tuple(range(32)), 0, "m", "p")
    out = get_codec("kivi2").decode(get_codec("kivi2").encode(kv)).kv
    assert (out - x).abs().max() < 0.2 * 0.5


@pytest.mark.parametrize("level", [1, 2, 3])
def test_cachegen_error_is_at_most_half_a_per_token_step(level: int) -> None:
    kv = _kv()
    out = get_codec(f"cachegen-{level}").decode(get_codec(f"cachegen-{level}").encode(kv)).kv
    bins_k, bins_v = layer_bins(4, level)
    for layer in range(4):
        for kind, bins in ((0, bins_k[layer]), (1, bins_v[layer])):
            x = kv.kv[layer, kind].permute(1, 0, 2).reshape(37, -1)  # [tokens, channels]
            y = out[layer, kind].permute(1, 0, 2).reshape(37, -1)
            step = x.abs().amax(dim=1, keepdim=True) / (bins // 2 - 1)
            # the stored scale is rounded up to bfloat16: at most 1.2 % above the maximum
            assert ((y - x).abs() <= step / 2 * 1.012 + 1e-6).all()


def test_cachegen_levels_trade_size_for_error_and_beat_int8() -> None:
    kv = _kv(layers=6, heads=4, tokens=200, dim=32)
    sizes, errors = {}, {}
    for spec in ("int8", "cachegen-1", "cachegen-2", "cachegen-3"):
        blob = get_codec(spec).encode(kv)
        sizes[spec] = len(blob)
        errors[spec] = float((get_codec(spec).decode(blob).kv - kv.kv).norm() / kv.kv.norm())
    assert sizes["cachegen-1"] < sizes["cachegen-2"] < sizes["cachegen-3"] < sizes["int8"]
    assert errors["cachegen-1"] > errors["cachegen-2"] > errors["cachegen-3"] > errors["int8"]


def test_cachegen_bins_follow_depth_not_model_names() -> None:
    keys, values = layer_bins(32, 3)  # the released config's 32-layer shape
    assert keys == [32] * 10 + [16] * 22 and values == [32] * 2 + [16] * 30
    keys, values = layer_bins(24, 2)
    assert keys[0] > keys[-1] and values[0] > values[-1] and len(keys) == 24


@pytest.mark.parametrize("spec", BENCH_CODECS)
def test_any_flipped_byte_or_truncation_is_detected(spec: str) -> None:
    data = get_codec(spec).encode(_kv(layers=2, tokens=9))
    rng = random.Random(spec)
    for pos in rng.sample(range(len(data)), 60):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptCacheError):
            get_codec(spec).decode(bytes(damaged))
        with pytest.raises(CorruptCacheError):
            decode_entry(bytes(damaged))
    for keep in rng.sample(range(len(data)), 20):
        with pytest.raises(CorruptCacheError):
            get_codec(spec).decode(data[:keep])


def test_an_entry_of_another_model_is_refused() -> None:
    data = get_codec("int8").encode(_kv())
    with pytest.raises(CacheMismatchError, match="another model|belongs to model"):
        decode_entry(data, model_fingerprint="x" * 64)
    assert decode_entry(data, model_fingerprint="m" * 64).num_tokens == 37


def test_unknown_version_names_the_versions() -> None:
    data = get_codec("raw").encode(_kv())
    body = bytearray(data[:-32])
    struct.pack_into("<4sH", body, 0, MAGIC, 9)
    resigned = bytes(body) + hashlib.blake2b(bytes(body), digest_size=32).digest()
    with pytest.raises(CorruptCacheError, match="format version 9"):
        decode_entry(resigned)


def test_header_is_self_describing_and_any_entry_decodes_by_its_codec() -> None:
    data = get_codec("cachegen-3").encode(_kv())
    header = read_header(data)
    assert header["codec"] == "cachegen" and header["params"]["level"] == 3
    assert header["shape"] == [4, 2, 2, 37, 16] and header["num_tokens"] == 37 and len(header["sections"]) == 4
    assert torch.equal(decode_entry(data).kv, get_codec("cachegen-3").decode(data).kv)
    with pytest.raises(CorruptCacheError, match="written by codec 'cachegen'"):
        get_codec("int8").decode(data)


def test_layers_stream_in_order_and_match_the_whole_decode() -> None:
    codec = get_codec("cachegen-2")
    data = codec.encode(_kv())
    whole = codec.decode(data).kv
    layers = list(codec.iter_layers(data))
    assert len(layers) == 4 and all(torch.equal(a, whole[i]) for i, a in enumerate(layers))


def test_version_1_raw_entries_still_decode() -> None:
    kv = _kv()
    raw = kv.kv.contiguous().view(torch.int32).numpy().tobytes()
    header = {"codec": "raw", "dtype": "float32", "shape": list(kv.kv.shape), "raw_bytes": len(raw),
              "token_ids": list(kv.token_ids), "position_offset": 9, "model_fingerprint": "m" * 64,
              "prefix_fingerprint": "p" * 64}
    import json

    head = json.dumps(header).encode()
    body = struct.pack("<4sHI", MAGIC, 1, len(head)) + head + zstandard.ZstdCompressor().compress(raw)
    data = body + hashlib.blake2b(body, digest_size=32).digest()
    assert torch.equal(decode_entry(data).kv, kv.kv)


@pytest.mark.parametrize("spec", ["zip", "raw-2", "cachegen-4", "kivi2:group=x", "int8:level=3", "cachegen-two"])
def test_bad_specs_are_clear_errors(spec: str) -> None:
    with pytest.raises(InvalidInputError):
        get_codec(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: dequantisation on the GPU")
@pytest.mark.parametrize("spec", BENCH_CODECS)
def test_decoding_onto_a_device_gives_the_same_tensors(spec: str) -> None:
    device = "cuda"
    data = get_codec(spec).encode(_kv())
    on_device = decode_entry(data, device=device).kv
    assert on_device.device.type == device
    assert torch.allclose(on_device.cpu(), decode_entry(data).kv, atol=1e-6)


def test_a_newer_format_or_unknown_codec_is_unsupported_not_corrupt() -> None:
    from chunkcache.codec import UnsupportedCacheError

    data = get_codec("raw").encode(_kv())
    body = bytearray(data[:-32])
    struct.pack_into("<4sH", body, 0, MAGIC, 99)
    newer = bytes(body) + hashlib.blake2b(bytes(body), digest_size=32).digest()
    with pytest.raises(UnsupportedCacheError, match="upgrade chunkcache"):
        decode_entry(newer)
