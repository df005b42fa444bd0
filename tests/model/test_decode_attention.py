"""Batched decode attention (`chunkcache.model.decode_attention`) against an fp64 loop over the
sequences: writes land at each sequence's index and nowhere else, every sequence attends over
its own buffer up to that index, with and without key splits, GQA groups that are not a power of
two, fp32 and bf16. The kernel tests run in a child pytest under TRITON_INTERPRET=1 (as in
test_sparse_attention.py) unless the interpreter or CUDA is already active here."""

from __future__ import annotations

import pytest
import torch

from chunkcache.model import decode_attention as da
from chunkcache.model.decode_attention import DecodeTable, splits_for, table_of
from chunkcache.triton_jit import interpreter_active
from tests.triton_child import kernel_device, run_kernel_tests_in_child

SCALE = 0.3


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: list[torch.Tensor], at: list[int],
           layer: int) -> torch.Tensor:
    heads, batch, d = q.shape
    group = heads // k.shape[0]
    out = torch.empty(batch, heads * d, dtype=torch.float64)
    for b in range(batch):
        keys = buffers[b][layer, 0].double().clone()
        values = buffers[b][layer, 1].double().clone()
        keys[:, at[b]], values[:, at[b]] = k[:, b].double(), v[:, b].double()
        for h in range(heads):
            w = torch.softmax(q[h, b].double() @ keys[h // group, : at[b] + 1].T * SCALE, dim=0)
            out[b, h * d : (h + 1) * d] = w @ values[h // group, : at[b] + 1]
    return out


@pytest.mark.parametrize(("dtype", "heads", "kv_heads", "dim", "split_keys", "tol"), [
    (torch.float32, 9, 3, 64, 1024, 1e-5),  # SmolLM2's group of 3, one split
    (torch.float32, 8, 2, 16, 128, 1e-5),  # several splits, a sequence that reaches only the first
    (torch.bfloat16, 4, 4, 32, 64, 2e-2),  # no grouping, bf16
])
def test_kernel_writes_then_attends_per_sequence(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, heads: int,
                                                 kv_heads: int, dim: int, split_keys: int, tol: float) -> None:
    device = kernel_device()
    monkeypatch.setattr(da, "SPLIT_KEYS", split_keys)
    gen = torch.Generator().manual_seed(0)
    capacities, at = [300, 700, 40], [299, 400, 0]
    buffers = [torch.randn(3, 2, kv_heads, c, dim, generator=gen).to(device, dtype) for c in capacities]
    before = [b.clone() for b in buffers]
    q = torch.randn(3, heads, dim, generator=gen).to(device, dtype).transpose(0, 1)  # [heads, B, d], strided
    k, v = (torch.randn(3, kv_heads, dim, generator=gen).to(device, dtype).transpose(0, 1) for _ in range(2))
    rows = torch.tensor(table_of(buffers, at), dtype=torch.long, device=device)
    table = DecodeTable(rows[0], rows[1], rows[2], splits_for(max(capacities)))
    assert (table.splits > 1) == (split_keys < 700)
    out = da.decode_attention(q, k, v, table, 1, SCALE)
    assert out.shape == (3, heads * dim) and out.dtype == dtype
    expected = _naive(q.cpu(), k.cpu(), v.cpu(), [b.cpu() for b in before], at, 1)
    torch.testing.assert_close(out.cpu().double(), expected, atol=tol, rtol=tol)
    for b in range(3):  # the fresh K/V at its index of layer 1, nothing else touched
        before[b][1, 0, :, at[b]], before[b][1, 1, :, at[b]] = k[:, b], v[:, b]
        assert torch.equal(buffers[b], before[b])


def test_kernel_ignores_what_lies_past_each_index() -> None:
    """Keys after a sequence's index (a longer sequence's, garbage, NaN) never reach it."""
    device = kernel_device()
    gen = torch.Generator().manual_seed(1)
    buffers = [torch.randn(1, 2, 2, 100, 16, generator=gen).to(device) for _ in range(2)]
    q = torch.randn(4, 2, 16, generator=gen).to(device)
    k, v = torch.randn(2, 2, 2, 16, generator=gen).to(device)
    rows = torch.tensor(table_of(buffers, [10, 50]), dtype=torch.long, device=device)
    table = DecodeTable(rows[0], rows[1], rows[2], splits_for(100))
    clean = da.decode_attention(q, k, v, table, 0, SCALE)
    buffers[0][0, :, :, 11:] = float("nan")
    buffers[1][0, :, :, 51:] = 1e4
    torch.testing.assert_close(da.decode_attention(q, k, v, table, 0, SCALE), clean, atol=0, rtol=0)


def test_split_buckets_are_powers_of_two() -> None:
    assert [splits_for(c) for c in (1, 512, 513, 1024, 1025, 8192, 8193)] == [1, 1, 2, 2, 4, 16, 32]


def test_table_of_refuses_a_strided_buffer() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        table_of([torch.zeros(2, 2, 1, 8, 16)[:, :, :, :4]], [0])


def test_kernel_tests_under_interpreter() -> None:
    run_kernel_tests_in_child(__file__)

def test_the_decode_attention_compiles_for_a_hopper_gpu() -> None:
    """The interpreter does not compile: Triton's own compiler, with the ptxas its wheel ships,
    builds the kernels for sm_90 here without a GPU, at the launch configuration each head size
    and dtype gets (an 8B model's bf16 group of 4; SmolLM2's fp32 group of 3), and none spills
    to the stack or local memory."""
    import inspect
    import subprocess
    import tempfile
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter decorates the kernels itself: compiled in a process without it")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this triton wheel ships no ptxas / cuobjdump")
    write, attend, merge = da._compiled(False)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    cases = [(write, "bf16", 128, 4, {}), (merge, "bf16", 128, 4, {}),
             (attend, "bf16", 128, 4, {"SPLIT": False}), (attend, "bf16", 128, 4, {"SPLIT": True}),
             (attend, "fp32", 64, 3, {"SPLIT": False}), (attend, "fp32", 64, 3, {"SPLIT": True}),
             (attend, "bf16", 256, 8, {"SPLIT": True}), (attend, "fp32", 128, 2, {"SPLIT": True})]
    for kernel, dtype, dim, group, extra in cases:
        block_n, num_warps = da.launch_config(dim, torch_dtype[dtype])
        params = inspect.signature(kernel.fn).parameters
        signature = {}
        for name, p in params.items():
            if p.annotation != inspect.Parameter.empty:
                signature[name] = "constexpr"
            elif name in ("Base", "Cap", "At"):
                signature[name] = "*i64"
            elif name == "Part":
                signature[name] = "*fp32"
            elif name[0].isupper():
                signature[name] = "*" + dtype
            else:
                signature[name] = "fp32" if name == "qk_scale" else "i32"
        consts = {"KV_HEADS": 8, "GROUP": group, "ROWS": max(16, 1 << (group - 1).bit_length()), "HEAD_DIM": dim,
                  "BLOCK_N": block_n, "IEEE": dtype == "fp32", "UPCAST": False, **extra}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature,
                                            constexprs={k: v for k, v in consts.items() if k in params}),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps if kernel is attend else 4, "enable_fp_fusion": True})
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
        assert "LOCAL:0" in usage and "STACK:0" in usage, (kernel.fn.__name__, dtype, dim, usage)
        assert compiled.metadata.shared <= 99 * 1024, (kernel.fn.__name__, dtype, dim, compiled.metadata.shared)
