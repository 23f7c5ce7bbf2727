"""The native int8-activation linears (kinds 4-7: the int4 and Q8 blocks repacked 16 rows
interleaved, inputs quantised to int8 per block of 32 in one or two parts) against torch.

The kernels must compute exactly the dot product of the file's weights with the quantised
input (fp32 rounding aside); how far that moves a model's logits from float activations is
in test_fast_paths. Skipped where the kernels or their int8 dot products are missing
(native.int8_dot_products()).
"""

import pytest
import torch

from pipeline_dsl.engine import native
from pipeline_dsl.engine.quant import (KIND_Q4, KIND_Q4X16, KIND_Q8, KIND_Q8X16, X16_TWO_PARTS, Int4Blocks,
                                       Int4Linear, Q8Linear, native_linear)

pytestmark = pytest.mark.skipif(native.load() is None or not native.int8_activations(),
                                reason="native kernels or their int8 dot products unavailable here")


PARTS = {"int8": 1, "int8x2": 2}


@pytest.fixture(params=["int8", "int8x2"])
def act(request, monkeypatch):
    """The inputs' form: one int8 part, or two (the leftover of the first rounding again)."""
    monkeypatch.setenv("AGP_NATIVE_ACT", request.param)
    return request.param


def quantised(x: torch.Tensor, parts: int) -> torch.Tensor:
    """x [T, K] as the kernels see it, in float64: per block of 32 with d = max|x| / 127, hi =
    round(x / d), and with two parts lo = round((x / d - hi) * 254): d * (hi + lo / 254)."""
    T, K = x.shape
    xb = x.float().view(T, K // 32, 32)                                   # [T, K/32, 32]
    amax = xb.abs().amax(-1, keepdim=True)                                # [T, K/32, 1]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))     # float32, as the kernel
    v = xb * inv
    hi = torch.round(v)                                                   # nearest, ties to even
    q = hi.double()
    if parts == 2:
        lo = torch.round((v - hi) * 254.0)
        assert lo.abs().max() <= 127
        q = q + lo.double() / 254
    assert hi.abs().max() <= 127
    return (q * (amax.double() / 127)).view(T, K)


def random_int4(N: int, K: int, g: torch.Generator) -> Int4Blocks:
    return Int4Blocks(torch.randint(0, 16, (N, K), generator=g).to(torch.uint8),
                      torch.rand(N, K // 32, generator=g) * 0.1, torch.randn(N, K // 32, generator=g) * 0.1)


def effective(blocks: Int4Blocks) -> torch.Tensor:
    """The int4 layer's weights [N, K] in float64: (q - 8) * s + z, s and z as the layer keeps them (bf16)."""
    s = blocks.scale.bfloat16().double().repeat_interleave(32, 1)          # [N, K]
    z = blocks.zero.bfloat16().double().repeat_interleave(32, 1)
    return (blocks.q.double() - 8) * s + z


@pytest.mark.parametrize("T", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("N,K", [(16, 32), (64, 64), (960, 576), (48, 1536)])
def test_int4_x16_kernel_is_the_dot_product_with_the_int8_input(N, K, T, act):
    g = torch.Generator().manual_seed(N + K + T)
    blocks = random_int4(N, K, g)
    lin = Int4Linear(blocks, torch.bfloat16)
    assert lin.native_struct().kind == KIND_Q4X16 + (X16_TWO_PARTS if act == "int8x2" else 0)
    w = effective(blocks)                                                  # [N, K]
    x = torch.randn(T, K, generator=g) * 3
    x[0, :32] = 0                                                          # an all-zero block: scale 0
    y = native_linear(lin, x).double()                                     # [T, N]
    ref = quantised(x, PARTS[act]) @ w.t()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("T", [1, 3, 8, 9])
@pytest.mark.parametrize("N,K", [(299, 64), (32, 96), (4099, 576)])
def test_q8_x16_kernel_is_the_dot_product_with_the_int8_input_for_any_row_count(N, K, T, act):
    g = torch.Generator().manual_seed(N + K + T)
    scale = torch.rand(N, K // 32, generator=g) * 0.01
    w = torch.randint(-127, 128, (N, K), generator=g).float() * scale.repeat_interleave(32, 1)
    lin = Q8Linear(w, torch.bfloat16)
    assert lin.native_struct().kind == KIND_Q8X16 + (X16_TWO_PARTS if act == "int8x2" else 0)
    x = torch.randn(T, K, generator=g)
    y = native_linear(lin, x).double()                                     # [T, N]: no write past N
    ref = quantised(x, PARTS[act]) @ (lin.qweight.double().view(N, K // 32, 32) * lin.scale.double()[..., None]).view(N, K).t()
    assert y.shape == (T, N)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("T", [1, 3])
def test_q8_x16_kernel_is_exact_at_the_largest_weights_and_inputs(T, act):
    """Every weight at +-127 and every input at its block's largest magnitude: a pair of products
    reaches 2 * 255 * 127 in the unsigned form (q + 128) that vpdpbusd multiplies, past the int16
    into which AVX2's pmaddubsw sums a pair; the kernel must still give the exact dot product."""
    N, K = 32, 64
    g = torch.Generator().manual_seed(T)
    sign = torch.randint(0, 2, (N, K), generator=g).float() * 2 - 1
    sign[: N // 2] = 1.0                                                   # rows of +127 only
    lin = Q8Linear(sign * 0.01, torch.bfloat16)
    assert lin.qweight.abs().min().item() == 127
    x = torch.ones(T, K)
    x[1:, ::3] = -1.0                                                      # every |input| its block's largest
    y = native_linear(lin, x).double()
    ref = quantised(x, PARTS[act]) @ (lin.qweight.double().view(N, K // 32, 32) * lin.scale.double()[..., None]).view(N, K).t()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("T", [1, 3])
def test_int4_x16_kernel_is_exact_at_the_largest_nibbles_and_inputs(T, act):
    """Every nibble 15 (or 0) and every input at its block's largest magnitude, or (second part)
    half a step from it: without VNNI the kernel sums a block's eight pmaddubsw results in int16,
    each of them 2 * 15 * 127 = 3810 here, eight 30480, next to 32767; the kernel must still give
    the exact dot product, of either sign."""
    N, K = 32, 96
    q = torch.full((N, K), 15, dtype=torch.uint8)
    q[N // 2:, 1::5] = 0                                                   # some rows mix 15 and 0
    blocks = Int4Blocks(q, torch.full((N, K // 32), 0.01), torch.full((N, K // 32), -0.02))
    lin = Int4Linear(blocks, torch.bfloat16)
    x = torch.full((T, K), 127.0)                                          # hi 127 at every input
    x[0, 32:64] = -127.0
    x[0, 64:] = 126.5                                                      # hi 126, lo 127 (v - hi = 1/2)
    x[0, 64] = 127.0                                                       # the block's largest
    if T > 1:
        x[1] = -x[0]
        x[2, ::2] = -127.0
    y = native_linear(lin, x).double()
    ref = quantised(x, PARTS[act]) @ effective(blocks).t()
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_input_row_stays_non_finite_and_leaves_the_other_rows_alone(bad, act):
    """+inf into the int8 linears came out of the AVX2 build as -inf (its int8 code -128: packs
    saturating the conversion's 0x80000000, where AVX-512 truncates it to 0), and a NaN could
    come out finite (max drops a NaN). A row with inf or NaN gives non-finite outputs (NaN), as
    torch's float product is non-finite, the same on either ISA; the other rows are exact."""
    g = torch.Generator().manual_seed(7)
    for lin, w in ((lambda b: (Int4Linear(b, torch.bfloat16), effective(b)))(random_int4(32, 64, g)),
                   (lambda q: (q, (q.qweight.double().view(32, 2, 32) * q.scale.double()[..., None]).view(32, 64)))(
                       Q8Linear(torch.ones(32, 64) * 0.01, torch.bfloat16))):
        x = torch.randn(3, 64, generator=g)
        x[1, 40] = bad                                                     # the second block of row 1
        y = native_linear(lin, x).double()
        assert not torch.isfinite(y[1]).any(), (type(lin).__name__, y[1, :4])
        assert not torch.isfinite(x[1:2].double() @ w.t()).any()           # torch's is non-finite too
        keep = [0, 2]
        ref = quantised(x[keep], PARTS[act]) @ w.t()
        assert torch.allclose(y[keep], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_q8_blocks_of_a_q8_0_weight_are_lossless_and_of_any_other_within_half_a_step():
    """Q8Linear: one scale per block of 32 inputs, the block's absmax / 127 (GGUF Q8_0's). A
    weight that is already Q8_0 (its blocks' int8 values times a scale) comes back exactly
    (`lossless`: the lm_head may then run on it alone); any other within half a step."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 2, 32), generator=g)
    q[:, :, 5] = -127                                                   # each block's largest
    scale = 2.0 ** -torch.randint(4, 10, (32, 2), generator=g)          # exact in float32
    w = (q * scale[..., None]).view(32, 64).float()
    lin = Q8Linear(w, torch.float32)
    assert lin.lossless and torch.equal(lin.dequantized(), w)
    w = torch.randn(32, 64, generator=g)
    lin = Q8Linear(w, torch.float32)
    steps = (lin.dequantized() - w).abs() / lin.scale.repeat_interleave(32, dim=1)   # [32, 64]
    assert not lin.lossless and steps.max() <= 0.5 + 1e-4


def test_int8_activations_off_keeps_the_float_kernels(monkeypatch):
    monkeypatch.setenv("AGP_NATIVE_ACT", "f32")
    g = torch.Generator().manual_seed(0)
    blocks = random_int4(32, 64, g)
    lin4 = Int4Linear(blocks, torch.bfloat16)
    lin8 = Q8Linear(torch.randn(32, 64, generator=g), torch.bfloat16)
    assert lin4.x16 is None and lin4.native_struct().kind == KIND_Q4
    assert lin8.x16 is None and lin8.native_struct().kind == KIND_Q8
    x = torch.randn(2, 64, generator=g)
    ref = x.double() @ effective(blocks).t()                               # float inputs: no int8 rounding
    assert torch.allclose(native_linear(lin4, x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_two_parts_round_the_input_254_times_finer_than_one():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g)
    step = x.view(4, 2, 32).abs().amax(-1).repeat_interleave(32, 1) / 127  # [4, 64] one part's step
    assert ((quantised(x, 1) - x.double()).abs() <= step / 2 * 1.0001).all()
    assert ((quantised(x, 2) - x.double()).abs() <= step / 2 / 254 * 1.01).all()


def test_an_int4_layer_keeps_only_its_x16_records_and_still_dequantises():
    g = torch.Generator().manual_seed(1)
    blocks = random_int4(48, 96, g)
    lin = Int4Linear(blocks, torch.bfloat16)                               # no dense copy: efficient's form
    assert lin.x16 is not None and lin.nibbles is None and lin.sz is None   # one copy of the blocks
    ref = ((blocks.q.bfloat16() - 8) * blocks.scale.bfloat16().repeat_interleave(32, 1)
           + blocks.zero.bfloat16().repeat_interleave(32, 1))              # the bf16 arithmetic of dequantized()
    assert torch.equal(lin.dequantized(), ref)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_prefill_rows_take_the_int8_kernel_where_bf16_is_emulated(monkeypatch, fast_bf16):
    """Above 8 rows the dense bf16 copy wins only with bf16 in hardware (AMX, AVX512-BF16);
    elsewhere oneDNN emulates it and the int8 kernel keeps every row count (a mixed step's
    prefill piece and decodes too)."""
    from pipeline_dsl.engine.quant import DenseLinear, PackedLinear, packing_works
    monkeypatch.setattr(native, "fast_bf16", lambda: fast_bf16)
    g = torch.Generator().manual_seed(2)
    blocks = random_int4(64, 96, g)
    # the dense copy make_linear gives: packed where oneDNN's bf16 packing runs (not on AVX2)
    dense = (PackedLinear if packing_works() else DenseLinear)(effective(blocks).bfloat16())
    lin = Int4Linear(blocks, torch.bfloat16, dense)
    for rows in (40, 300):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        int8 = native_linear(lin, x).bfloat16()
        assert torch.equal(lin(x), dense(x) if fast_bf16 else int8)
    assert lin.x16_rows == 8 if fast_bf16 else lin.x16_rows >= 1 << 20


@pytest.mark.parametrize("qtype, want", [("Q4_1", torch.bfloat16), ("F32", None)])
def test_auto_takes_bf16_for_the_files_4bit_blocks_on_int8_kernels(tmp_path, qtype, want):
    """`dtype = auto` where bf16 is not in hardware: a model whose every linear is the file's
    4-bit blocks runs them on the int8 kernels in bf16 storage; a float file stays on the CPU's
    best float dtype (fp32 there: emulated bf16 GEMMs would be ~10x slower)."""
    from pipeline_dsl.engine.gguf_loader import load_gguf
    from pipeline_dsl.engine.model import LlamaModel
    from tiny_model import write_tiny_gguf

    g = load_gguf(write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, hidden_size=64, intermediate_size=128))
    best = torch.bfloat16 if native.fast_bf16() else torch.float32
    assert LlamaModel(g.config, g.weights, "auto").dtype == (want or best)
    assert LlamaModel(g.config, g.weights, "fp32").dtype == torch.float32        # asked for: kept
