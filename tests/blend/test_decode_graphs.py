"""The batched decode step (`chunkcache.blend.decode_graphs`): its tokens and caches equal the
per-sequence loop's over several steps of sequences of different lengths, capacities and key
splits, with a padding row (run with the Triton kernel under its interpreter in a child, as the
kernel tests are); on an emulated GPU a step reads back once and copies once, asynchronously,
and two steps of different sequences in one bucket make exactly the same device calls with the
same numbers, which is what lets one CUDA graph serve both."""

from __future__ import annotations

import pytest
import torch

from chunkcache.blend import decode as decode_module
from chunkcache.blend.decode import DecodeSequence, Sampling, pick_tokens, step
from chunkcache.blend.decode_graphs import TableDecoder, batch_bucket, use_decode_mode
from chunkcache.blend.layout import FusedCache
from chunkcache.errors import InvalidInputError
from chunkcache.model import decode_attention as da
from chunkcache.model import executor as executor_module
from chunkcache.model.executor import ApeAttention, LayerExecutor
from chunkcache.triton_jit import interpreter_active
from tests.fake_cuda import FakeCuda
from tests.triton_child import kernel_device, run_kernel_tests_in_child



def _executor(dtype: torch.dtype = torch.float32, kv_heads: int = 2, device: str = "cpu") -> LayerExecutor:
    """A tiny random Llama whose GQA group (3) is not a power of two, as SmolLM2's (or MQA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=16,
                                  max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LayerExecutor(AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval())


def _sequences(ex: LayerExecutor, lengths: list[int], capacities: list[int], seed: int,
               put=lambda t: t, samplings: list[Sampling] | None = None,  # noqa: ANN001 - the fake's tagger
               limits: list[int] | None = None) -> list[DecodeSequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (n, cap) in enumerate(zip(lengths, capacities)):
        kv = torch.randn(ex.num_layers, 2, ex.num_kv_heads, cap, ex.head_dim, generator=gen).to(ex.device, ex.dtype)
        logits = torch.randn(96, generator=gen).to(ex.device)
        seqs.append(DecodeSequence(FusedCache(put(kv), n, n + 3), put(logits), (limits or [50] * len(lengths))[i], (),
                                   (samplings or [Sampling()] * len(lengths))[i]))
    return seqs


def _clone(seqs: list[DecodeSequence]) -> list[DecodeSequence]:
    return [DecodeSequence(FusedCache(s.cache.kv.clone(), s.cache.length, s.cache.next_position), s.logits.clone(),
                           s.max_new_tokens, (), s.sampling) for s in seqs]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a kernel that fails and hands over to the loop fails here
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kernel_steps_equal_the_loop(monkeypatch: pytest.MonkeyPatch, kv_heads: int) -> None:
    """Three sequences (one greedy that ends after two tokens, one sampled, one greedy; buckets 4,
    then 2 with padding), then one alone (bucket 1) over a longer cache: the batched kernel's
    tokens, logits and caches equal the per-sequence loop's, with GQA and with one KV head."""
    device = kernel_device()
    monkeypatch.setattr(da, "SPLIT_KEYS", 64)  # splits at the lengths the interpreter affords
    ex = _executor(kv_heads=kv_heads, device=device)
    samplings = [Sampling(), Sampling(temperature=0.7, seed=3), Sampling()]
    loop = _sequences(ex, [5, 70, 130], [40, 100, 200], seed=1, samplings=samplings, limits=[2, 50, 50])
    batched = _clone(loop)
    use_decode_mode(ex, "loop")
    tokens_loop = [step(ex, loop) for _ in range(3)]
    decoder = use_decode_mode(ex, "kernel")
    assert decoder is not None and batch_bucket(3) == 4
    assert [step(ex, batched) for _ in range(3)] == tokens_loop
    assert loop[0].done and batched[0].done and len(tokens_loop[-1]) == 2  # the last step ran at bucket 2
    for a, b in zip(loop, batched):
        assert a.cache.length == b.cache.length and a.cache.next_position == b.cache.next_position
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.cache.kv, a.cache.kv, atol=1e-5, rtol=1e-5)
    alone_loop, alone = _sequences(ex, [300], [400], seed=2), _sequences(ex, [300], [400], seed=2)
    use_decode_mode(ex, "loop")
    expect = [step(ex, alone_loop) for _ in range(2)]
    decoder = use_decode_mode(ex, "kernel")
    assert [step(ex, alone) for _ in range(2)] == expect
    torch.testing.assert_close(alone[0].cache.kv, alone_loop[0].cache.kv, atol=1e-5, rtol=1e-5)
    assert decoder is not None and not decoder.disabled and decoder.stats.steps == 2


def test_kernel_tests_under_interpreter() -> None:
    run_kernel_tests_in_child(__file__)


def test_a_step_in_one_bucket_makes_the_same_device_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the emulated GPU (the kernel's launch stood in for by device operations of the same
    shapes, its numbers recorded): one read and one asynchronous copy per step, and steps of
    different sequences (lengths, capacities, tokens) in one bucket call the device identically."""
    fake = FakeCuda()
    ex = _executor(torch.bfloat16)
    launches: list[tuple[object, ...]] = []

    def stand_in(q, k, v, table, layer, scale):  # noqa: ANN001, ANN202
        launches.append((layer, table.splits, scale, tuple(q.shape), q.stride(), k.stride(), table.at.shape))
        return q.transpose(0, 1).reshape(q.shape[1], -1) * 1.0

    monkeypatch.setattr(executor_module, "decode_attention", stand_in)
    bodies = []
    body = TableDecoder._body

    def watched(self: TableDecoder, bucket: object) -> torch.Tensor:  # what a graph would capture
        with fake.watch() as record:
            out = body(self, bucket)  # type: ignore[arg-type]
        bodies.append((record, list(launches)))
        return out

    with fake.active():
        fake.executor_on_device(ex)
        decoder = TableDecoder(ex, graphs=False)
        monkeypatch.setattr(decode_module, "table_decoder", lambda _: decoder)
        step(ex, _sequences(ex, [4, 9, 20], [30, 40, 50], seed=3, put=fake.put))  # the bucket's buffers made
        batches = [_sequences(ex, lengths, capacities, seed=seed, put=fake.put) for seed, lengths, capacities in
                   ((4, [7, 3, 25], [64, 20, 100]), (5, [2, 40, 11, 60], [10, 300, 12, 500]))]
        for seqs in batches:  # a whole step: one read (the tokens), one asynchronous copy (the inputs)
            with fake.watch() as record:
                step(ex, seqs)
            assert [kind for kind, _ in record.waits] == ["read"] and record.async_copies == 1, record.summary()
        monkeypatch.setattr(TableDecoder, "_body", watched)
        for seqs in batches:
            launches.clear()
            step(ex, seqs)
    (first, first_launches), (second, second_launches) = bodies
    assert not first.waits and not second.waits
    assert first.calls == second.calls and first_launches == second_launches
    assert len(first_launches) == ex.num_layers and decoder.stats.steps == 5


def test_what_the_batched_step_takes_and_which_mode_runs_where() -> None:
    ex = _executor()
    seqs = _sequences(ex, [3, 4], [8, 8], seed=6)
    decoder = TableDecoder(ex, graphs=True)
    assert not decoder.graphs  # no CUDA here: nothing to capture
    assert decoder.takes(seqs)
    ape = FusedCache(seqs[0].cache.kv, 3, 3, ApeAttention(torch.zeros(8, dtype=torch.bool), 0.9, 0.9))
    assert not decoder.takes([DecodeSequence(ape, seqs[0].logits, 4, ())])
    kv = seqs[0].cache.kv
    assert not decoder.takes([DecodeSequence(FusedCache(kv[:, :, :, :4], 3, 3), seqs[0].logits, 4, ())])  # strided
    shifted = torch.zeros(kv.numel() + 1, dtype=kv.dtype)[1:].view(kv.shape)  # contiguous, 4 bytes off alignment
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    assert not decoder.takes([DecodeSequence(FusedCache(shifted, 3, 3), seqs[0].logits, 4, ())])
    assert not decoder.takes([DecodeSequence(FusedCache(kv, 8, 8), seqs[0].logits, 4, ())])  # full: no room
    with pytest.raises(InvalidInputError, match="decode_mode must be one of"):
        use_decode_mode(ex, "fast")
    if not interpreter_active():
        assert use_decode_mode(ex, "auto") is None  # the CPU loops over the sequences
        with pytest.raises(InvalidInputError, match="needs triton"):
            use_decode_mode(ex, "kernel")



def test_a_batched_step_that_fails_at_first_hands_over_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that cannot run here (no CUDA, no interpreter: as a compile or launch failure on a
    GPU would) costs one warning and the loop answers, with the loop's tokens; once a batched step
    has run, an error is the request's and propagates."""
    if interpreter_active() or torch.cuda.is_available():
        pytest.skip("the kernels run here")
    ex = _executor()
    loop = _sequences(ex, [5, 9], [20, 30], seed=7)
    batched = _clone(loop)
    use_decode_mode(ex, "loop")
    expect = [step(ex, loop) for _ in range(3)]
    decoder = TableDecoder(ex, graphs=False)
    monkeypatch.setattr(decode_module, "table_decoder", lambda _: decoder)
    with pytest.warns(RuntimeWarning, match="failed on its first step") as caught:
        got = [step(ex, batched) for _ in range(3)]
    assert got == expect and decoder.disabled and len(caught) == 1
    proven = TableDecoder(ex, graphs=False)
    monkeypatch.setattr(decode_module, "table_decoder", lambda _: proven)
    calls = []

    def works_once(q, k, v, table, layer, scale):  # noqa: ANN001, ANN202
        calls.append(layer)
        if len(calls) > ex.num_layers:
            raise RuntimeError("out of memory")
        return q.transpose(0, 1).reshape(q.shape[1], -1)

    monkeypatch.setattr(executor_module, "decode_attention", works_once)
    step(ex, batched)
    with pytest.raises(RuntimeError, match="out of memory"):
        step(ex, batched)


def test_warming_steps_every_batch_bucket_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve`'s warm-up: one step per batch bucket up to max_batch (where graphs are captured),
    and one over a cache long enough to split its keys."""
    ex = _executor()
    sizes = []

    def stand_in(q, k, v, table, layer, scale):  # noqa: ANN001, ANN202
        if layer == 0:
            sizes.append((int(table.at.shape[0]), table.splits))
        return q.transpose(0, 1).reshape(q.shape[1], -1)

    monkeypatch.setattr(executor_module, "decode_attention", stand_in)
    decoder = TableDecoder(ex, graphs=False)
    assert decoder.warm(5) == 5 and decoder.stats.steps == 5
    assert sizes == [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2)]  # and the split kernels once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graphs are captured on a GPU")
def test_graphs_replay_the_loops_tokens_without_waiting() -> None:
    """On a GPU: steps replayed from captured graphs give the loop's tokens, one capture per
    bucket, and a replayed step (the read of the tokens aside) never synchronises."""
    ex = _executor(device="cuda")
    loop = _sequences(ex, [5, 70, 600], [40, 100, 700], seed=1)
    graphed = _clone(loop)
    use_decode_mode(ex, "loop")
    expect = [step(ex, loop) for _ in range(5)]
    decoder = use_decode_mode(ex, "graphs")
    assert decoder is not None and decoder.graphs
    got = []
    for i in range(5):  # `step`, with the device watched from the second advance on (the first captures)
        tokens = pick_tokens(graphed)
        got.append(tokens)
        for s, token in zip(graphed, tokens):
            s.accept(token)
        torch.cuda.set_sync_debug_mode("error" if i else "default")
        try:
            decode_module.advance(ex, graphed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert got == expect
    assert decoder.stats.captures == 1 and decoder.stats.replays == 5, decoder.stats
