"""Sparse-query causal attention: the plain-torch reference against a naive fp64 loop, and the
Triton kernel against the reference for the index patterns, layouts and dtypes chunk fusion
produces. The kernel tests run in this process when Triton's interpreter is active here or on
CUDA; otherwise (the usual CPU run) `test_kernel_tests_under_interpreter` runs them in a child
pytest started with TRITON_INTERPRET=1, because the interpreter must be chosen before triton is
imported and another test may have imported it already. The split-KV path is reached at the
interpreter's small S by lowering the minimum split size (`_MIN_SPLIT_KEYS`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkcache.model import sparse_attention
from chunkcache.model.sparse_attention import (
    _splits,
    interpreter_active,
    launch_config,
    reference_sparse_attention,
    sparse_query_attention,
)

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.3  # not d ** -0.5, so a kernel that ignores the scale fails


def _naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Each query head alone, each query alone, softmax over keys 0..index[i], in fp64."""
    heads, n, d = q.shape
    group = heads // keys.shape[0]
    out = torch.empty(n, heads * d, dtype=torch.float64)
    for h in range(heads):
        k, v = keys[h // group].double(), values[h // group].double()
        for i in range(n):
            last = int(index[i]) + 1
            weights = torch.softmax(q[h, i].double() @ k[:last].T * scale, dim=0)
            out[i, h * d:(h + 1) * d] = weights @ v[:last]
    return out


def _inputs(heads: int, kv_heads: int, S: int, d: int, index: torch.Tensor, dtype: torch.dtype = torch.float32,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(heads, index.shape[0], d, generator=gen)
    keys, values = torch.randn(2, kv_heads, S, d, generator=gen)
    return q.to(device, dtype), keys.to(device, dtype), values.to(device, dtype)


def _sorted_with_duplicates(n: int, S: int, seed: int = 1) -> torch.Tensor:
    index = torch.randint(0, S, (n,), generator=torch.Generator().manual_seed(seed)).sort().values
    index[n // 3] = index[n // 3 + 1]  # at least one duplicate whatever the draw
    return index


def _question_span(n: int, S: int, span: int = 20) -> torch.Tensor:
    """Scattered recomputed tokens, then the question: a contiguous run up to the last position."""
    scattered = torch.randperm(S - span, generator=torch.Generator().manual_seed(2))[: n - span].sort().values
    return torch.cat((scattered, torch.arange(S - span, S)))


INDEX_CASES = {
    "duplicates": lambda: (_sorted_with_duplicates(100, 300), 300),  # n, S not multiples of 64
    "question_span": lambda: (_question_span(70, 250), 250),
    "single_first": lambda: (torch.tensor([0]), 129),
    "single_last": lambda: (torch.tensor([128]), 129),
    "all_positions": lambda: (torch.arange(65), 65),
}


# --- the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_matches_naive_loop(case: str, kv_heads: int) -> None:
    index, S = INDEX_CASES[case]()
    q, keys, values = _inputs(4, kv_heads, S, 16, index, torch.float64)
    out = reference_sparse_attention(q, keys, values, index, SCALE)
    assert out.shape == (index.shape[0], 4 * 16) and out.is_contiguous()
    torch.testing.assert_close(out, _naive(q, keys, values, index, SCALE), rtol=1e-10, atol=1e-10)


def test_reference_rejects_mismatched_heads() -> None:
    index = torch.tensor([1, 2])
    q, keys, values = _inputs(3, 2, 8, 16, index)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        reference_sparse_attention(q, keys, values, index, SCALE)


# --- the Triton kernel --------------------------------------------------------------------------
def _interpreter_unusable() -> str | None:
    """Why Triton's interpreter cannot run loops with a run-time bound here, if it cannot."""
    import numpy
    import triton
    from packaging.version import Version

    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        # Before 3.7 the interpreter takes int() of a shape-(1,) array, which NumPy 2.4 refuses.
        return f"Triton {triton.__version__}'s interpreter does not work with NumPy {numpy.__version__}"
    return None


@pytest.fixture()
def device() -> str:
    """Where the kernel runs in this process: the CPU under the interpreter, else CUDA."""
    pytest.importorskip("triton")
    if interpreter_active():
        if reason := _interpreter_unusable():
            pytest.skip(reason)
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no interpreter and no GPU here: test_kernel_tests_under_interpreter runs this in a child")


def _check_kernel(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                  atol: float = 1e-5, rtol: float = 1e-5) -> torch.Tensor:
    out = sparse_query_attention(q, keys, values, index, SCALE)
    assert out.shape == (q.shape[1], q.shape[0] * q.shape[2]) and out.dtype == q.dtype and out.is_contiguous()
    expected = reference_sparse_attention(q.float(), keys.float(), values.float(), index, SCALE)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    return out


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kernel_matches_reference_fp32(device: str, case: str, kv_heads: int) -> None:
    index, S = INDEX_CASES[case]()
    _check_kernel(*_inputs(4, kv_heads, S, 32, index, device=device), index.to(device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_16_bit(device: str, dtype: torch.dtype) -> None:
    index = _question_span(90, 300)
    _check_kernel(*_inputs(4, 2, 300, 32, index, dtype, device), index.to(device), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("d,dtype", [(16, torch.float32), (64, torch.float32), (128, torch.float32),
                                     (256, torch.float32), (128, torch.float16), (256, torch.bfloat16)])
def test_kernel_each_launch_config(device: str, d: int, dtype: torch.dtype) -> None:
    index = _sorted_with_duplicates(40, 150)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    _check_kernel(*_inputs(2, 1, 150, d, index, dtype, device), index.to(device), atol=tol, rtol=tol)


# the largest index inside S, and S - 1; split into 3 splits of 96 keys, the last one holding 200
@pytest.mark.parametrize("last,split", [(200, False), (259, False), (200, True)])
def test_kernel_ignores_cache_past_the_largest_index(device: str, monkeypatch: pytest.MonkeyPatch, last: int,
                                                     split: bool) -> None:
    """K/V as views into a [layers, 2, kv_heads, capacity, d] buffer whose tail (past the largest
    index, inside and past S) holds huge values (must not change the result) or NaN values
    (proves those rows are never loaded: a loaded, masked NaN value would still poison P @ V);
    q as the transposed view of [n, heads, d] that q_proj(x).view gives."""
    if split:
        monkeypatch.setattr(sparse_attention, "_MIN_SPLIT_KEYS", 64)
    S, capacity, kv_heads, d = 260, 333, 2, 32
    index = _sorted_with_duplicates(77, last)
    index[-1] = last
    index = index.to(device)
    q, keys, values = _inputs(4, kv_heads, S, d, index, device=device)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert q.stride(0) == d and not q.is_contiguous()
    buf = torch.zeros(2, 2, kv_heads, capacity, d, device=device)
    buf[1, 0, :, :S], buf[1, 1, :, :S] = keys, values
    clean = sparse_query_attention(q, keys[:, : last + 1].clone(), values[:, : last + 1].clone(), index, SCALE)

    buf[1, :, :, last + 1:] = 1e4
    poisoned = _check_kernel(q, buf[1, 0, :, :S], buf[1, 1, :, :S], index)
    assert torch.equal(poisoned, clean)

    buf[1, 1, :, last + 1:] = float("nan")
    assert torch.equal(sparse_query_attention(q, buf[1, 0, :, :S], buf[1, 1, :, :S], index, SCALE), clean)


def test_kernel_empty_and_rejected_inputs(device: str) -> None:
    index = torch.tensor([3], device=device)
    q, keys, values = _inputs(4, 2, 10, 16, index, device=device)
    empty = sparse_query_attention(q[:, :0], keys, values, index[:0], SCALE)
    assert empty.shape == (0, 64)
    with pytest.raises(ValueError, match="power of two"):
        sparse_query_attention(*_inputs(4, 2, 10, 24, index, device=device), index, SCALE)
    with pytest.raises(ValueError, match="last stride"):
        sparse_query_attention(torch.randn(4, 1, 32, device=device)[:, :, ::2], keys, values, index, SCALE)
    with pytest.raises(TypeError, match="supports"):
        sparse_query_attention(q.double(), keys.double(), values.double(), index, SCALE)


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting TRITON_INTERPRET after triton was imported cannot switch the interpreter on."""
    pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter is active in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    index = torch.tensor([2, 5, 5])
    with pytest.raises(RuntimeError, match="before the process imports triton"):
        sparse_query_attention(*_inputs(2, 2, 6, 16, index), index, SCALE)


# --- split-KV ------------------------------------------------------------------------------------
def test_split_rule_on_an_h100_for_an_8b_model() -> None:
    """32 heads: one decoded token or a 32-token question is one block a head, 32 programs on 132
    SMs; 264 // 32 = 8 splits of 4096 keys at S = 32K. Enough programs, or too few keys: no split."""
    assert _splits(32, 32768, 132, 64, 512) == (8, 4096)
    assert _splits(64, 32768, 132, 64, 512) == (4, 8192)
    assert _splits(32, 1000, 132, 64, 512) == (1, 1000)  # one split of 512 would be all but the last
    assert _splits(133, 32768, 132, 64, 512) == (1, 32768)
    assert _splits(4, 3000, 132, 64, 512) == (5, 640)  # 5 splits of >= 512 keys, in whole blocks


def test_split_rule_bounds() -> None:
    """Whole blocks of at least min_split keys that cover [0, S) with a non-empty last split, never
    more than two programs an SM in all, and a split only where the programs alone fill no SM each."""
    for n_programs in (1, 3, 32, 66, 100, 132, 133, 4000):
        for S in (1, 63, 512, 1000, 1025, 4096, 32768, 100003):
            for sms, block_n, min_split in ((132, 64, 512), (78, 32, 1024), (1, 16, 64), (132, 64, 16)):
                splits, split_len = _splits(n_programs, S, sms, block_n, min_split)
                if splits == 1:
                    assert split_len == S
                    continue
                assert n_programs <= sms and n_programs * splits <= 2 * sms
                assert split_len % block_n == 0 and split_len >= max(min_split, block_n)
                assert (splits - 1) * split_len < S <= splits * split_len


def _split_index(case: str, S: int) -> torch.Tensor:
    if case == "decode":
        return torch.tensor([S - 1])
    if case == "question":
        return torch.arange(S - 32, S)
    # 64 queries below 60 (whole query blocks whose later splits are empty), then a few scattered up
    # to S - 1 in the last block (rows before a split's first key inside a split that has keys)
    low = torch.randint(0, 60, (64,), generator=torch.Generator().manual_seed(3)).sort().values
    return torch.cat((low, torch.tensor([61, 100, 150, 151, 250, S - 1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 1])  # GQA groups 1 and 4
@pytest.mark.parametrize("case", ["decode", "question", "scattered"])
def test_kernel_split_kv_matches_reference(device: str, monkeypatch: pytest.MonkeyPatch, case: str,
                                           kv_heads: int, dtype: torch.dtype) -> None:
    monkeypatch.setattr(sparse_attention, "_MIN_SPLIT_KEYS", 64)
    S, heads, d = 300, 4, 32
    index = _split_index(case, S)
    block_m, block_n, _, _ = launch_config(d, dtype)
    splits, split_len = _splits(heads * -(-index.shape[0] // block_m), S, 132, block_n, 64)
    assert splits > 1 and S % split_len  # the last split is shorter
    if case == "scattered":
        assert index[:block_m].max() < split_len  # the first query block has keys in split 0 only
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    _check_kernel(*_inputs(heads, kv_heads, S, d, index, dtype, device), index.to(device), atol=tol, rtol=tol)


def test_kernel_split_rule_ignores_index_values(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split count (grid and scratch size) comes from shapes alone: a CUDA graph replayed with
    other indices keeps a valid grid."""
    monkeypatch.setattr(sparse_attention, "_MIN_SPLIT_KEYS", 64)
    calls = []
    monkeypatch.setattr(sparse_attention, "_splits", lambda *args: calls.append(args) or _splits(*args))
    for index in (torch.tensor([0, 1, 2]), torch.tensor([5, 200, 299])):
        _check_kernel(*_inputs(4, 2, 300, 16, index, device=device), index.to(device))
    assert len(calls) == 2 and calls[0] == calls[1]
    sms = calls[0][2]
    if device == "cpu":
        assert sms == sparse_attention._PRETEND_SMS
    else:
        assert sms == torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_kernel_tests_under_interpreter() -> None:
    pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter is active here: the kernel tests ran in this process")
    if reason := _interpreter_unusable():
        pytest.skip(reason)
    child = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel and not under_interpreter"],
                 {"TRITON_INTERPRET": "1"})
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0 and "passed" in summary and "skipped" not in summary, child.stdout[-4000:]


def test_imports_and_reports_without_triton() -> None:
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError\n"
        "from chunkcache.model.sparse_attention import (interpreter_active, reference_sparse_attention,\n"
        "                                               sparse_query_attention, triton_available)\n"
        "assert not triton_available() and not interpreter_active()\n"
        "i = torch.tensor([0, 3]); q = torch.randn(2, 2, 16); k, v = torch.randn(2, 1, 8, 16)\n"
        "assert reference_sparse_attention(q, k, v, i, 0.25).shape == (2, 32)\n"
        "try:\n"
        "    sparse_query_attention(q, k, v, i, 0.25)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    child = _run(["-c", code], {})
    assert child.returncode == 0 and "needs triton" in child.stdout, child.stderr


# --- compiled on a GPU (skipped without one) -----------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                     (torch.float16, 256)])
@pytest.mark.parametrize("n", [400, 32, 1])  # 400: unsplit (forced); 32 and 1: split-KV
def test_cuda_without_host_sync_and_in_a_graph(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, d: int,
                                               n: int) -> None:
    """No host sync; a captured call reads the index on the device at every replay."""
    pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter is active in this process")
    S, heads, kv_heads, tol = 3000, 8, 2, 1e-4 if dtype == torch.float32 else 2e-2
    if n == 400:
        monkeypatch.setattr(sparse_attention, "_MIN_SPLIT_KEYS", 1 << 30)
    else:
        sms = sparse_attention._sm_count(torch.device("cuda", torch.cuda.current_device()))
        assert _splits(heads, S, sms, launch_config(d, dtype)[1], sparse_attention._MIN_SPLIT_KEYS)[0] > 1
    index = _question_span(n, S, min(n, 20)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(index.shape[0], heads, d, device="cuda", generator=gen, dtype=dtype).transpose(0, 1)
    buf = torch.randn(2, 2, kv_heads, S + 100, d, device="cuda", generator=gen, dtype=dtype)
    keys, values = buf[1, 0, :, :S], buf[1, 1, :, :S]
    sparse_query_attention(q, keys, values, index, SCALE)  # compiles outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sparse_query_attention(q, keys, values, index, SCALE)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = reference_sparse_attention(q.float(), keys.float(), values.float(), index, SCALE)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparse_query_attention(q, keys, values, index, SCALE)
    index.copy_(_sorted_with_duplicates(n, S // 2) if n > 2 else torch.tensor([S // 2]))
    graph.replay()
    expected = reference_sparse_attention(q.float(), keys.float(), values.float(), index, SCALE)
    torch.testing.assert_close(captured.float(), expected, atol=tol, rtol=tol)
