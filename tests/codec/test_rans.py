"""The interleaved rANS coder of container version 3: exact round trips, one bitstream whichever
implementation wrote or reads it (numba, numpy, the Triton kernel), forged streams refused, and
version-2 cachegen entries still decoding to what they decoded to before.

The kernel tests run on the CPU in a child process started with TRITON_INTERPRET=1 (the
interpreter is a per-process choice), and on CUDA where there is a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chunkcache.codec import decode_entry, get_codec, rans
from chunkcache.codec.base import unpack
from chunkcache.codec.entropy import channel_tables
from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV
from chunkcache.triton_jit import interpreter_active

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]
# (lanes, tokens, alphabet): partial groups, one and zero tokens, the largest alphabet (31)
SHAPES = [(5, 7, 5), (70, 20, 15), (64, 1, 31), (33, 0, 9), (96, 40, 3), (1, 300, 31)]


def _symbols(lanes: int, tokens: int, alphabet: int, seed: int = 0, spread: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, alphabet, size=(lanes, 1))
    x = np.round(rng.normal(centre, max(spread * alphabet, 0.3), size=(lanes, tokens)))
    x[: lanes // 3, :] = alphabet // 2  # some lanes hold one symbol only
    return np.clip(x, 0, alphabet - 1).astype(np.int32)


def _coded(lanes: int, tokens: int, alphabet: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
    symbols = _symbols(lanes, tokens, alphabet, seed)
    cum = rans.freq_table(channel_tables(symbols, alphabet))
    return symbols, cum, rans.encode(symbols, cum)


def test_freq_table_keeps_every_seen_symbol_and_sums_to_total() -> None:
    counts = np.array([[255, 1, 0, 1], [0, 0, 0, 0], [3, 3, 3, 3], [0, 0, 7, 0]], dtype=np.uint8)
    cum = rans.freq_table(counts)
    freq = np.diff(cum, axis=1)
    assert (cum[:, 0] == 0).all() and (cum[:, -1] == rans.TOTAL).all()
    assert ((freq > 0) == (counts > 0))[[0, 2, 3]].all()
    assert freq[1, 0] == rans.TOTAL  # an empty lane: all symbol 0


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact_and_numba_and_numpy_agree_bit_for_bit(shape: tuple[int, int, int]) -> None:
    symbols, cum, (states, counts, words) = _coded(*shape)
    assert len(counts) == rans.groups_of(shape[0]) and states.dtype == np.uint32 and words.dtype == np.uint16
    assert np.array_equal(rans.decode(states, counts, words, cum, shape[1]), symbols)
    ref_states, ref_counts, ref_words = rans._encode_np(symbols, cum)
    assert np.array_equal(ref_states, states) and np.array_equal(ref_counts, counts)
    assert np.array_equal(ref_words, words)
    out, bad = rans._decode_np(states, counts, words, cum, shape[1])
    assert bad == -1 and np.array_equal(out, symbols)


def test_the_coder_compresses_to_near_the_entropy() -> None:
    symbols, cum, (states, counts, words) = _coded(64, 400, 15)
    p = np.diff(cum, axis=1) / rans.TOTAL
    bits = -sum(np.log2(p[lane, symbols[lane]]).sum() for lane in range(64))
    coded_bits = 16 * len(words) + 32 * len(states)
    assert bits <= coded_bits <= bits * 1.02 + 32 * 64  # within 2 % plus the lanes' final states


@pytest.mark.parametrize("damage", ["drop a word", "extra word", "flip a word", "flip a state", "wrong count"])
def test_a_forged_stream_is_refused(damage: str) -> None:
    """Streams that pass the container's digest but were not written by this encoder."""
    symbols, cum, (states, counts, words) = _coded(70, 30, 15, seed=3)
    states, counts, words = states.copy(), counts.copy(), words.copy()
    if damage == "drop a word":
        words, counts[-1] = words[:-1], counts[-1] - 1
    elif damage == "extra word":
        words, counts[-1] = np.append(words, np.uint16(7)), counts[-1] + 1
    elif damage == "flip a word":
        words[len(words) // 2] ^= 0x0100
    elif damage == "flip a state":
        states[4] ^= 0x00010000
    else:
        counts[0] += 1
    for decoder in (rans.decode, lambda *a: _numpy_decode(*a)):
        with pytest.raises(CorruptCacheError):
            decoder(states, counts, words, cum, 30)


def _numpy_decode(states: np.ndarray, counts: np.ndarray, words: np.ndarray, cum: np.ndarray, tokens: int) -> None:
    if int(counts.sum()) != len(words):
        raise CorruptCacheError("counts")
    if rans._decode_np(states, counts, words, cum, tokens)[1] >= 0:
        raise CorruptCacheError("group")


# written by the version-2 code (c0ae32d^) from the KV of the test below; raw, int8 and kivi2 kept
# their sections in version 3, cachegen changed its entropy coder
@pytest.mark.parametrize("name", ["cachegen2", "cachegen1-delta", "raw", "int8", "kivi2"])
def test_version_2_entries_still_decode_to_the_same_values(name: str) -> None:
    data = (DATA / f"{name}.v2.cckv").read_bytes()
    expected = np.frombuffer((DATA / f"{name}.v2.f32").read_bytes(), dtype="<f4")
    assert unpack(data).version == 2
    out = decode_entry(data).kv
    assert torch.equal(out.reshape(-1), torch.from_numpy(expected.copy()))


@pytest.mark.parametrize(("name", "spec"), [("cachegen2", "cachegen-2"), ("cachegen1-delta", "cachegen-1:delta=1:group=4")])
def test_version_3_changes_the_bitstream_not_the_values(name: str, spec: str) -> None:
    g = torch.Generator().manual_seed(1)  # the KV the version-2 fixtures were written from
    kv = torch.randn(3, 2, 2, 23, 8, generator=g)
    kv[:, 0, :, :, 3] *= 20
    data = get_codec(spec).encode(ChunkKV(kv, tuple(range(23)), 9, "m" * 64, "p" * 64))
    assert unpack(data).version == 3
    expected = np.frombuffer((DATA / f"{name}.v2.f32").read_bytes(), dtype="<f4")
    assert torch.equal(decode_entry(data).kv.reshape(-1), torch.from_numpy(expected.copy()))


def test_without_numba_the_numpy_coder_writes_and_reads_the_same_bytes() -> None:
    code = (
        "import sys, numpy as np, torch\n"
        "sys.modules['numba'] = None\n"
        "from chunkcache.codec import get_codec, rans\n"
        "from chunkcache.kv import ChunkKV\n"
        "assert rans.compiled() is None\n"
        "g = torch.Generator().manual_seed(0)\n"
        "kv = ChunkKV(torch.randn(2, 2, 2, 45, 16, generator=g), tuple(range(45)), 0, 'm' * 64, 'p' * 64)\n"
        "for spec in ('cachegen-2', 'cachegen-1:delta=1:group=4'):\n"
        "    data = get_codec(spec).encode(kv)\n"
        "    sys.stdout.buffer.write(data)\n"
        "    sys.stdout.buffer.write(get_codec(spec).decode(data).kv.numpy().tobytes())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    g = torch.Generator().manual_seed(0)
    kv = ChunkKV(torch.randn(2, 2, 2, 45, 16, generator=g), tuple(range(45)), 0, "m" * 64, "p" * 64)
    here = b""
    for spec in ("cachegen-2", "cachegen-1:delta=1:group=4"):
        data = get_codec(spec).encode(kv)
        here += data + get_codec(spec).decode(data).kv.numpy().tobytes()
    assert child.stdout == here


# --- the Triton kernel (the GPU's decoder) ------------------------------------------------------
@pytest.fixture()
def kernel_device() -> str:
    """Where the kernel runs in this process: the CPU under the interpreter, else CUDA."""
    pytest.importorskip("triton")
    if interpreter_active():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no interpreter and no GPU here: test_kernel_tests_under_interpreter runs these in a child")


def test_kernel_decodes_several_blocks_in_one_launch_bit_for_bit(kernel_device: str) -> None:
    from chunkcache.codec.rans_triton import decode_groups, group_meta

    shapes = [shape for shape in SHAPES if shape[1] <= 40]  # the interpreter runs a token a step
    blocks = [_coded(*shape, seed=i) for i, shape in enumerate(shapes)]
    width = max(b[1].shape[1] for b in blocks)
    states, cums, words, metas = [], [], [], []
    lane = word = out = 0
    for (symbols, cum, (st, counts, w)), (lanes, tokens, _) in zip(blocks, shapes):
        metas.append(group_meta(lanes, tokens, counts, lane, word, out))
        states.append(st)
        cums.append(np.pad(cum, ((0, 0), (0, width - cum.shape[1])), constant_values=rans.TOTAL))
        words.append(w)
        lane, word, out = lane + lanes, word + len(w), out + lanes * tokens
    dev = torch.device(kernel_device)
    result = torch.full((out,), 255, dtype=torch.uint8, device=dev)
    decode_groups(torch.from_numpy(np.concatenate(states).view(np.int32)).to(dev),
                  torch.from_numpy(np.concatenate(cums)).to(dev),
                  torch.from_numpy(np.concatenate(words).view(np.int16)).to(dev),
                  torch.from_numpy(np.concatenate(metas)).to(dev), result)
    flat = np.concatenate([b[0].reshape(-1) for b in blocks])
    assert np.array_equal(result.cpu().numpy(), flat.astype(np.uint8))


@pytest.mark.parametrize(("spec", "dtype"), [
    ("cachegen-1", torch.float32), ("cachegen-3", torch.float32), ("cachegen-2:delta=1:group=4", torch.float32),
    ("cachegen-2", torch.bfloat16), ("cachegen-3:delta=1:group=10", torch.bfloat16),
])
def test_kernel_path_of_the_codec_is_bit_identical_to_the_cpu_decoder(
    kernel_device: str, monkeypatch: pytest.MonkeyPatch, spec: str, dtype: torch.dtype
) -> None:
    from chunkcache.codec import cachegen

    g = torch.Generator().manual_seed(5)
    kv = ChunkKV((torch.randn(3, 2, 2, 41, 16, generator=g) * 3).to(dtype), tuple(range(41)), 0, "m" * 64, "p" * 64)
    data = get_codec(spec).encode(kv)
    on_cpu = decode_entry(data).kv
    monkeypatch.setattr(cachegen, "_kernel_decodes", lambda device: True)  # the interpreter takes CPU tensors
    by_kernel = decode_entry(data, device=kernel_device).kv
    assert by_kernel.dtype == dtype and torch.equal(by_kernel.cpu(), on_cpu)


@pytest.mark.parametrize("spec", ["cachegen-2", "cachegen-1:delta=1:group=4"])
def test_kernel_decodes_an_encoded_layer_into_the_fusions_staging_slot(kernel_device: str, spec: str) -> None:
    """The path a GPU fusion takes: the store hands over a layer's unpacked bytes
    (`DeviceLayer`), the side stream uploads and decodes it into a bf16 staging view."""
    from chunkcache.codec.base import DeviceLayer

    g = torch.Generator().manual_seed(7)
    kv = ChunkKV(torch.randn(2, 2, 2, 29, 16, generator=g).to(torch.bfloat16), tuple(range(29)), 0, "m" * 64, "p" * 64)
    codec = get_codec(spec)
    entry = codec.open(codec.encode(kv))
    slot = torch.zeros(2, 2, 2, 40, 16, dtype=torch.bfloat16, device=kernel_device)  # two layers, room to spare
    for i in range(2):
        DeviceLayer(codec, entry, i, codec.unpack_layer(entry, i)).into(slot[i, :, :, 5:34])
        assert torch.equal(slot[i, :, :, 5:34].cpu(), codec.layer(entry, i, torch.device("cpu")))
    assert not slot[:, :, :, :5].any() and not slot[:, :, :, 34:].any()


def test_kernel_tests_under_interpreter() -> None:
    pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter is active here: the kernel tests ran in this process")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel and not under_interpreter"],
        cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0 and "passed" in summary and "skipped" not in summary, child.stdout[-4000:]
