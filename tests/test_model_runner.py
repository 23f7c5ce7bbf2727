"""The Llama model and its ModelRunner on the tiny random GGUF: paged KV, prefix sharing,
batched decode, padding, precisions."""

import numpy as np
import pytest
import torch

from pipeline_dsl.engine.gguf_loader import load_gguf, permute_qk, unpermute_qk
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from tiny_model import write_tiny_gguf

BS = 4  # small blocks so that every test crosses block boundaries


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return load_gguf(tiny_gguf)


@pytest.fixture(scope="module")
def model(tiny):
    return LlamaModel(tiny.config, tiny.weights, "fp32")


def seq(n, seed):
    return np.random.default_rng(seed).integers(3, 290, size=n).tolist()


def run_alone(model, ids, chunks=(None,)):
    """Feed ids in the given chunk sizes through a fresh runner; logits of the last token."""
    runner = ModelRunner(model, num_blocks=64, block_size=BS)
    table = list(range(7, 7 + (len(ids) + BS - 1) // BS))  # not starting at block 0
    pos, out = 0, None
    for size in chunks:
        size = size or len(ids) - pos
        out = runner.execute([SeqBatchItem(ids[pos:pos + size], pos, table, True)])
        pos += size
    assert pos == len(ids)
    return out[0]


def test_tiny_gguf_loads_config_and_all_weights(tiny):
    c = tiny.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 2, 4, 2, 16)
    assert c.vocab_size == tiny.weights["embed"].shape[0] == len(tiny.metadata["tokenizer.ggml.tokens"])
    assert tiny.weights["layers.1.gate"].shape == (128, 64)
    assert c.tie_embeddings and "lm_head" not in tiny.weights


def test_unpermute_undoes_llama_cpp_qk_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
    assert not np.array_equal(permute_qk(w, 8), w)


def test_prefill_logits_match_full_forward(model):
    ids = seq(11, 0)
    ref = model.forward_full(ids)
    assert torch.allclose(run_alone(model, ids), ref[-1], atol=1e-4)


def test_chunked_prefill_and_decode_match_full_forward(model):
    ids = seq(14, 1)
    ref = model.forward_full(ids)
    got = run_alone(model, ids, chunks=(5, 3, 4, 1, 1))
    assert torch.allclose(got, ref[-1], atol=1e-4)


def test_shared_prefix_blocks_give_same_logits_as_fresh_forward(model):
    prefix, a_tail, b_tail = seq(8, 2), seq(3, 3), seq(5, 4)   # prefix = 2 full blocks
    runner = ModelRunner(model, num_blocks=32, block_size=BS)
    runner.execute([SeqBatchItem(prefix + a_tail, 0, [10, 11, 12], True)])
    # B reuses A's two prefix blocks and only computes its own tail
    got = runner.execute([SeqBatchItem(b_tail, 8, [10, 11, 20, 21], True)])[0]
    ref = model.forward_full(prefix + b_tail)[-1]
    assert torch.allclose(got, ref, atol=1e-4)


def _decode_batch(model, prompts, steps, *, pad=False, batched=True):
    """Prefill each prompt, then greedy-decode `steps` tokens; returns per-step logits."""
    runner = ModelRunner(model, num_blocks=128, block_size=BS, pad_decode=pad)
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(len(prompts))]
    last = runner.execute([SeqBatchItem(p, 0, t, True) for p, t in zip(prompts, tables)])
    lens = [len(p) for p in prompts]
    history = [last]
    for _ in range(steps):
        nxt = last.argmax(-1).tolist()
        items = [SeqBatchItem([tok], n, t, True) for tok, n, t in zip(nxt, lens, tables)]
        if batched:
            last = runner.execute(items)
        else:
            last = torch.cat([runner.execute([it]) for it in items])
        lens = [n + 1 for n in lens]
        history.append(last)
    return torch.stack(history)  # [steps+1, B, V]


def test_batched_decode_equals_one_at_a_time(model):
    prompts = [seq(n, 10 + n) for n in (3, 9, 6, 13)]
    batched = _decode_batch(model, prompts, 6)
    alone = _decode_batch(model, prompts, 6, batched=False)
    assert torch.allclose(batched, alone, atol=1e-4)


def test_padded_decode_batch_gives_same_logits(model):
    prompts = [seq(n, 20 + n) for n in (5, 7, 2)]          # 3 -> padded to a bucket of 4
    assert torch.allclose(_decode_batch(model, prompts, 4, pad=True),
                          _decode_batch(model, prompts, 4), atol=1e-4)


def test_pad_to_pads_the_decode_batch_without_extra_logits(model):
    a, b = seq(6, 70), seq(3, 71)
    runner = ModelRunner(model, num_blocks=16, block_size=BS)
    runner.execute([SeqBatchItem(a, 0, [0, 1], False), SeqBatchItem(b, 0, [2], False)])
    out = runner.execute([SeqBatchItem([7], 6, [0, 1], True), SeqBatchItem([8], 3, [2], True)], pad_to=8)
    assert out.shape == (2, model.config.vocab_size)
    assert torch.allclose(out[0], model.forward_full(a + [7])[-1], atol=1e-4)
    assert torch.allclose(out[1], model.forward_full(b + [8])[-1], atol=1e-4)


def test_mixed_prefill_and_decode_in_one_step(model):
    a, b = seq(7, 30), seq(9, 31)
    runner = ModelRunner(model, num_blocks=32, block_size=BS)
    runner.execute([SeqBatchItem(a, 0, [0, 1], False)])     # not sampled: no logits
    out = runner.execute([
        SeqBatchItem(b[:4], 0, [4, 5, 6], False),            # non-final chunk: no row
        SeqBatchItem([5], 7, [0, 1], True),                  # decode
    ])
    assert out.shape == (1, model.config.vocab_size)
    assert torch.allclose(out[0], model.forward_full(a + [5])[-1], atol=1e-4)
    out = runner.execute([SeqBatchItem(b[4:], 4, [4, 5, 6], True), SeqBatchItem([6], 8, [0, 1, 2], True)])
    assert torch.allclose(out[0], model.forward_full(b)[-1], atol=1e-4)
    assert torch.allclose(out[1], model.forward_full(a + [5, 6])[-1], atol=1e-4)


def test_execute_without_sampled_items_returns_no_rows(model):
    runner = ModelRunner(model, num_blocks=8, block_size=BS)
    out = runner.execute([SeqBatchItem(seq(5, 40), 0, [0, 1], False)])
    assert out.shape == (0, model.config.vocab_size)


def test_block_table_too_short_is_a_clear_error(model):
    runner = ModelRunner(model, num_blocks=8, block_size=BS)
    with pytest.raises(ValueError, match="block table"):
        runner.execute([SeqBatchItem(seq(9, 41), 0, [0, 1], True)])


def test_a_batch_reaching_exactly_the_context_passes_and_one_position_more_is_refused():
    from pipeline_dsl.engine.batch import StepBatch, check_batch

    def batch(start, n):
        return StepBatch.from_items([SeqBatchItem(list(range(n)), start, [0, 1, 2], True)])

    check_batch(batch(7, 1), block_size=4, max_position=8)          # positions 0..7: the whole context
    check_batch(batch(0, 8), block_size=4, max_position=8)
    for start, n in ((8, 1), (1, 8)):
        with pytest.raises(ValueError, match="position 9 exceeds the model's context 8"):
            check_batch(batch(start, n), block_size=4, max_position=8)


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.15), ("int8", 0.15)])
def test_low_precision_logits_stay_close_to_fp32(tiny, model, dtype, tol):
    ids = seq(12, 50)
    ref = model.forward_full(ids)
    low = LlamaModel(tiny.config, tiny.weights, dtype)
    got = run_alone(low, ids, chunks=(8, 3, 1))
    rel = (got - ref[-1]).abs().max() / ref[-1].abs().max()
    assert rel < tol
    assert got.argmax() == ref[-1].argmax()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [False, True])
def test_a_dense_half_linear_computes_many_rows_in_fp32_where_its_type_is_emulated(monkeypatch, fast, dtype):
    """Without that type in hardware (bf16: AMX or AVX512-BF16; fp16: AMX-FP16 or AVX512-FP16)
    torch's bf16 and fp16 GEMMs are emulated, many times slower than fp32: a dense half weight
    computes more rows than the native step's in fp32, rounded once to its type; fewer rows, or
    any with the type in hardware, stay on torch's GEMM in that type."""
    import torch.nn.functional as F

    from pipeline_dsl.engine import native
    from pipeline_dsl.engine.quant import DenseLinear

    monkeypatch.setattr(native, "fast_bf16", lambda: fast)
    monkeypatch.setattr(native, "fast_fp16", lambda: fast)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 576, generator=g).to(dtype)
    lin = DenseLinear(w)
    for rows in (1, 8, 9, 64):
        x = torch.randn(rows, 576, generator=g).to(dtype)
        fp32 = F.linear(x.float(), w.float()).to(dtype)
        want = fp32 if rows > 8 and not fast else F.linear(x, w)
        assert torch.equal(lin(x), want), rows


@pytest.mark.parametrize("compute", ["model", torch.float32, torch.bfloat16])
def test_int8_weights_are_int8_with_per_channel_scales(tiny, compute):
    """"model": LlamaModel's int8 layer, in the compute dtype this CPU gives it (bf16 where bf16 is
    in hardware, else fp32); the others: the layer in each dtype, on any CPU."""
    from pipeline_dsl.engine.quant import Int8Linear

    w = torch.cat([tiny.weights["layers.0.q"], tiny.weights["layers.0.k"], tiny.weights["layers.0.v"]])
    if compute == "model":
        qkv = LlamaModel(tiny.config, tiny.weights, "int8").layers[0].qkv
    else:
        qkv = Int8Linear(w, compute)
    assert qkv.qweight.dtype == torch.int8 and qkv.scale.shape == (qkv.qweight.shape[0],)
    assert (qkv.dequantized().float() - w).abs().max() <= w.abs().max() / 127
    # symmetric, per channel: a row's scale is absmax / 127 (as the compute dtype holds it), its
    # largest weight +-127 steps of it, and every weight of the row within half a step of the one
    # kept (round to nearest against the scale the layer multiplies by)
    assert torch.equal(qkv.scale, (w.abs().amax(dim=1) / 127).to(qkv.scale.dtype))
    assert torch.equal(qkv.qweight.abs().amax(dim=1), torch.full((w.shape[0],), 127, dtype=torch.int8))
    steps = (qkv.qweight.float() * qkv.scale.float()[:, None] - w).abs() / qkv.scale.float()[:, None]  # [out, in]
    assert steps.max() <= 0.5 + 1e-4


def test_quantized_gguf_dequantises_close_to_its_float_source(tmp_path, tiny):
    q8 = load_gguf(write_tiny_gguf(tmp_path / "q8.gguf", qtype="Q8_0"))
    q4 = load_gguf(write_tiny_gguf(tmp_path / "q4.gguf", qtype="Q4_1"))
    for name in ("embed", "layers.0.q", "layers.1.down"):
        ref = tiny.weights[name]
        assert (q8.weights[name] - ref).abs().max() < 0.02 * ref.abs().max()
        assert (q4.weights[name] - ref).abs().max() < 0.2 * ref.abs().max()


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_gguf_tensors_dequantise_bit_for_bit_as_ggufs_reference(tmp_path, monkeypatch, qtype):
    """The loader runs each type's block formula over many rows per call (gguf's own loop takes
    16 rows at a time): the floats are gguf's, whatever the chunking."""
    from gguf import quants

    from pipeline_dsl.engine import gguf_loader
    from pipeline_dsl.model_files.gguf_header import read_gguf_header

    monkeypatch.setattr(gguf_loader, "DEQUANT_ROWS", 7)       # chunks that do not divide the rows
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype)
    seen = set()
    for t in gguf_loader.read_tensors(path, read_gguf_header(path)):
        seen.add(t.tensor_type.name)
        want = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)
        got = gguf_loader.dequantize(t)
        assert got.dtype == np.float32 and got.shape == tuple(t.shape) and np.array_equal(got, want), t.name
    assert qtype in seen


@pytest.mark.slow  # compiling takes ~30 s on a fresh machine (g++ builds inductor's headers cold)
def test_compiled_runner_matches_eager(tiny, monkeypatch):
    import torch._inductor.config as inductor

    # scalar C++ kernels: the same graphs, lowering and dynamic shapes as vectorised ones, for
    # ~8 s less of cold g++ (a third of the test on a fresh machine). No CPU compiles these pieces
    # outside this test (a runner's compile=True skips it on CPU): a device's are Triton kernels
    monkeypatch.setattr(inductor.cpp, "simdlen", 1)
    eager = LlamaModel(tiny.config, tiny.weights, "fp32")
    compiled = LlamaModel(tiny.config, tiny.weights, "fp32")
    ids = seq(10, 60)
    compiled.enable_compile(force=True)  # a runner's compile=True skips it on CPU
    runner = ModelRunner(compiled, num_blocks=16, block_size=BS, compile=True, pad_decode=True)
    runner.execute([SeqBatchItem(ids[:9], 0, [0, 1, 2], False)])
    got = runner.execute([SeqBatchItem(ids[9:], 9, [0, 1, 2], True)])[0]
    assert compiled.compiled() and compiled.compile_fallbacks() == []     # really compiled, no fallback
    assert torch.allclose(got, eager.forward_full(ids)[-1], atol=1e-4)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    return load_gguf(write_tiny_gguf(tmp_path_factory.mktemp("q4") / "q4.gguf", qtype="Q4_1"))


def test_q4_gguf_keeps_its_raw_4bit_blocks_equal_to_the_dequantised_weights(q4):
    assert set(q4.weights.int4) == {f"layers.{i}.{n}" for i in range(q4.config.num_layers)
                                    for n in ("q", "k", "v", "o", "gate", "up", "down")}
    for name, blocks in q4.weights.int4.items():
        assert blocks.q.dtype == torch.uint8 and int(blocks.q.max()) <= 15
        assert torch.allclose(blocks.dequantized(), q4.weights[name], atol=1e-6), name  # q/k unpermuted too


def test_int4_kernel_logits_match_the_dense_bf16_weights(q4):
    from pipeline_dsl.engine.quant import Int4Linear, int4_kernel_works
    if not int4_kernel_works():
        pytest.skip("no CPU int4 kernel in this torch build")
    int4 = LlamaModel(q4.config, q4.weights, "bf16")
    dense = LlamaModel(q4.config, dict(q4.weights), "bf16")   # a plain dict: no 4-bit blocks
    assert isinstance(int4.layers[0].gate_up, Int4Linear) and not isinstance(dense.layers[0].gate_up, Int4Linear)
    prompts = [seq(11, s) for s in range(3)]
    outs = []
    for m in (int4, dense):
        runner = ModelRunner(m, num_blocks=32, block_size=BS)
        tables = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
        # a 30-row prefill (dense copy) then 3-row decode steps (int4 kernel)
        got = [runner.execute([SeqBatchItem(p[:10], 0, t, True) for p, t in zip(prompts, tables)])]
        got.append(runner.execute([SeqBatchItem(p[10:], 10, t, True) for p, t in zip(prompts, tables)]))
        outs.append(torch.cat(got))
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() < 0.02 * scale
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_efficient_mode_runs_a_4bit_file_on_int4_alone(q4):
    from pipeline_dsl.engine import native
    from pipeline_dsl.engine.quant import Int4Linear, int4_kernel_works
    if not int4_kernel_works():
        pytest.skip("no CPU int4 kernel in this torch build")
    if not native.fast_bf16():   # int8 weights then compute in fp32: the int4 kernel is bf16's
        pytest.skip("this CPU has no fast bf16 (AMX or AVX512-BF16)")
    m = LlamaModel(q4.config, q4.weights, "int8")
    layer = m.layers[0]
    for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
        assert isinstance(lin, Int4Linear) and lin.dense is None   # no bf16 copy kept
    ids = seq(12, 50)
    ref = LlamaModel(q4.config, q4.weights, "fp32").forward_full(ids)[-1]
    got = run_alone(m, ids, chunks=(8, 3, 1))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() and got.argmax() == ref.argmax()


@pytest.mark.parametrize("table", [[7, 8, 9, 10, 11], [12, 3, 9, 0, 5]], ids=["consecutive", "scattered"])
def test_one_sequence_decoding_alone_matches_the_full_forward(model, table):
    ids = seq(17, 70)
    runner = ModelRunner(model, num_blocks=16, block_size=BS)
    runner.execute([SeqBatchItem(ids[:9], 0, table, False)])
    got = [runner.execute([SeqBatchItem([ids[p]], p, table, True)])[0] for p in range(9, 17)]
    ref = model.forward_full(ids)[9:]
    assert torch.allclose(torch.stack(got), ref, atol=1e-4)


def test_int4_layer_agrees_with_its_dequantised_weight_for_small_and_large_batches(q4):
    from pipeline_dsl.engine.quant import Int4Linear, int4_kernel_works
    if not int4_kernel_works():
        pytest.skip("no CPU int4 kernel in this torch build")
    blocks = q4.weights.int4["layers.0.gate"]
    lin = Int4Linear(blocks, torch.bfloat16)
    assert torch.allclose(lin.dequantized().float(), blocks.dequantized(), atol=2e-2, rtol=1e-2)
    for rows in (1, Int4Linear.large_batch + 5):   # the int4 kernel, then dequantise + matmul
        x = torch.randn(rows, blocks.q.shape[1], generator=torch.Generator().manual_seed(rows)).bfloat16()
        ref = x.float() @ blocks.dequantized().t()
        assert (lin(x).float() - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("packs", [False, True], ids=["dense", "prepacked"])
def test_the_words_for_4bit_blocks_without_the_native_library_name_each_batchs_kernel(q4, monkeypatch, packs):
    """Without agp's kernels a Q4_1 file's blocks run torch's int4 kernel up to 8 rows and the
    layer's bf16 copy past them, which on a CPU that emulates bf16 computes in fp32 where oneDNN
    does not pack bf16 weights (AVX2: DenseLinear), and on oneDNN's emulated bf16 GEMMs where it
    does (AVX-512 without bf16: PackedLinear), as docs/architecture.md says."""
    from pipeline_dsl.engine import native, quant
    from pipeline_dsl.engine.quant import Int4Linear

    if packs and not quant.packing_works():
        pytest.skip("oneDNN packs no bf16 weight here")
    monkeypatch.setattr(quant, "packing_works", lambda: packs)
    monkeypatch.setenv("AGP_NATIVE", "0")
    native.reset()
    monkeypatch.setattr(native, "fast_bf16", lambda: False)
    try:
        model = LlamaModel(q4.config, q4.weights, "bf16")
    finally:
        monkeypatch.delenv("AGP_NATIVE")
        native.reset()
    if not isinstance(model.layers[0].qkv, Int4Linear):
        pytest.skip("torch's int4 kernel does not run here")
    past = "oneDNN's emulated bfloat16 GEMMs" if packs else "torch's float32 GEMMs"
    assert model.linears_text() == (f"4-bit block weights on torch's int4 kernel up to 8 rows, {past} past, "
                                    "bfloat16 compute")
