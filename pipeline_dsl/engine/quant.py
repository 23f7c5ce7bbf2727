"""Linear layers as callables: dense, oneDNN-prepacked bf16, and int8 weight-only.

A model weight is turned once, at load time, into one of these; the forward pass only
calls `layer(x)` with x [T, in] -> [T, out].

- `DenseLinear`: `F.linear` on a contiguous [out, in] weight (fp32, fp16, CUDA); a bf16 one on
  a CPU that emulates bf16 computes steps of many rows in fp32.
- `PackedLinear`: the weight reordered once into oneDNN's blocked layout and run with
  `mkldnn._linear_pointwise` — on CPUs with AMX/AVX512-bf16 this is about 2x faster
  than `F.linear`, which reorders the weight on every call.
- `Int8Linear`: int8 weights with one scale per output channel (symmetric, absmax/127).
  Small batches use `aten._weight_int8pack_mm` (reads 1 byte per weight: fastest when
  memory bound); larger ones dequantise on the fly and run a dense matmul.
- `Int4Linear`: 4-bit weights in groups of 32 (`Int4Blocks`, read straight from a GGUF
  Q4_0/Q4_1 tensor: no float round trip) run by `aten._weight_int4pack_mm_for_cpu`,
  which reads half a byte per weight: 3-4x faster than bf16 for a few rows (decode
  is memory bound). Above `small_batch` rows it hands over to a dense bf16 copy when
  it has one (compute bound: AMX wins); without one, large batches dequantise on the fly.
  With the native kernels (pipeline_dsl.engine.native) small batches run agp's own int4
  kernel instead, on the same effective weights.

Every layer can describe itself to the native kernels (`native_struct()`: a C struct over
its tensors, or None), which is how the native decode step reads the weights in place.
With int8 activations (the native default, `native.activation_parts()`) the int4 and Q8
layers keep their blocks repacked once, 16 output rows interleaved (`pack_q4x16`,
`pack_q8x16`), for the kernels' int8 dot products: one contiguous stream per thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import ctypes

import torch
import torch.nn.functional as F

from . import native

INT4_GROUP = 32
KIND_F32, KIND_BF16, KIND_Q4, KIND_Q8, KIND_Q4X16, KIND_Q8X16 = 0, 1, 2, 3, 4, 5   # native.Lin.kind
X16_TWO_PARTS = 2  # kinds 4, 5 + this: the same records, inputs in two int8 parts
ROWS = 16          # output rows interleaved in the x16 forms


NO_ROW_LIMIT = 1 << 30


def x16_max_rows() -> int:
    """Up to how many rows a layer with x16 records runs the int8 kernel rather than its dense
    copy. With bf16 in hardware oneDNN's bf16 GEMMs take over above 8 rows (measured on AMX);
    without it they are emulated and the int8 kernel keeps every row count: on a 2-core Ice Lake
    (AVX-512 VNNI, no AMX) SmolLM2-135M's gate_up ran at 220-230 GFLOP/s through it at 256, 512
    and 1024 rows against 64 GFLOP/s for the emulated bf16 GEMM at 512 and 1024 (measured), and a
    mixed step (a 256-token prefill piece beside the decodes) is over 256 rows."""
    return 8 if native.fast_bf16() else NO_ROW_LIMIT


HALF_TYPES = {torch.bfloat16: ("bf16", "no AMX, no AVX512-BF16"),          # native.fast_half's types:
              torch.float16: ("fp16", "no AMX-FP16, no AVX512-FP16")}      # name, the flags a CPU lacks to emulate it


def emulated_half(dtype: torch.dtype, device) -> bool:
    """Whether torch's GEMM in `dtype` on `device` is emulated: a half type (bf16, fp16) on a CPU
    without it in hardware (native.fast_half)."""
    return dtype in HALF_TYPES and torch.device(device).type == "cpu" and not native.fast_half(dtype)


def runs_half_gemm(lin) -> torch.dtype | None:
    """The half type (bf16, fp16) in which some row counts of the linear `lin` go to torch's GEMM,
    or None: a dense or prepacked half weight, or an int4/Q8 layer's bf16 copy past the rows its
    kernels take. On a CPU without that type in hardware (native.fast_half) the GEMM is emulated
    (a bf16 512 x 2048 x 2048 one: ~14 s of CPU against 0.07 s in fp32 on an AVX2 EPYC, measured)
    where oneDNN packs the weight, and DenseLinear's converts it to fp32 every call: either is
    slower than an fp32 weight."""
    if isinstance(lin, (DenseLinear, PackedLinear)):
        return lin.weight.dtype if lin.weight.dtype in HALF_TYPES else None
    dense = getattr(lin, "dense", None)
    if dense is None or getattr(lin, "x16_rows", 0) >= NO_ROW_LIMIT:
        return None
    return runs_half_gemm(dense)


def pack_q4x16(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The native kind 4 records: q [N, K] uint8 0..15, scale and zero [N, K/32] bf16 ->
    uint8 [N/16, K/32, 320]; per 16 rows and block of 32: 4 x 64 bytes of nibbles (byte 4i+t of
    part j: row i's inputs 4j+t (low) and 16+4j+t (high)), then 16 scales, then 16 zeros."""
    N, K = q.shape
    G, nb = N // ROWS, K // INT4_GROUP
    q6 = q.view(G, ROWS, nb, 2, 4, 4)                                    # [G, i, b, half, j, t]
    nib = (q6[:, :, :, 0] | (q6[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [G, b, j, i, t]
    sz = [v.to(torch.bfloat16).view(G, ROWS, nb).transpose(1, 2).contiguous().view(torch.uint8)
          for v in (scale, zero)]                                        # [G, b, 32] each
    return torch.cat([nib.reshape(G, nb, 256), *sz], dim=-1).contiguous()  # [G, b, 320]


def unpack_q4x16(x16: torch.Tensor) -> torch.Tensor:
    """pack_q4x16's records [N/16, K/32, 320] -> q [N, K] uint8 0..15 (its scales and zeros are
    the layer's scales_zeros)."""
    G, nb = x16.shape[:2]
    nib = x16[..., :256].reshape(G, nb, 4, ROWS, 4)                          # [G, b, j, i, t]
    q = torch.stack([nib & 0x0F, nib >> 4], dim=3)                          # [G, b, j, half, i, t]
    return q.permute(0, 4, 1, 3, 2, 5).reshape(G * ROWS, nb * INT4_GROUP)   # [G, i, b, half, j, t]


def pack_q8x16(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The native kind 5 records: q [N, K] int8, scale [N, K/32] float -> uint8 [ceil(N/16), K/32,
    576] (rows padded with zeros to a multiple of 16); per 16 rows and block of 32: 8 x 64 bytes
    (byte 4i+t of part j: row i's input 4j+t, plus 128: unsigned), then the 16 scales."""
    N, K = q.shape
    G, nb = -(-N // ROWS), K // INT4_GROUP
    pad = G * ROWS - N
    qp = q.view(torch.uint8) ^ 0x80                           # x + 128 of each int8 x, in its own byte
    qp = F.pad(qp, (0, 0, 0, pad), value=128) if pad else qp                         # [G*16, K]
    w = qp.view(G, ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(G, nb, 512)       # [G, b, j*i*t]
    s = F.pad(scale.float(), (0, 0, 0, pad)).view(G, ROWS, nb).transpose(1, 2).contiguous()
    return torch.cat([w, s.view(torch.uint8).view(G, nb, 64)], dim=-1).contiguous()  # [G, b, 576]


def _lin(kind: int, w: torch.Tensor, s: torch.Tensor | None, n: int, k: int, round_out: bool):
    return native.Lin(kind, n, k, int(round_out), w.data_ptr(), s.data_ptr() if s is not None else None)


def native_linear(lin, x: torch.Tensor) -> torch.Tensor:
    """y [T, N] float32 = x [T, K] @ w.T through the native kernel of one layer."""
    lib = native.load()
    xf = x.float().contiguous()
    y = torch.empty(xf.shape[0], lin.out_features, dtype=torch.float32)
    lib.agp_linear(ctypes.byref(lin.native_struct()), xf.data_ptr(), xf.shape[0], y.data_ptr(),
                   torch.get_num_threads())
    return y


def _dense_struct(weight: torch.Tensor, round_out: bool):
    N, K = weight.shape
    if weight.device.type != "cpu" or K % 32 or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    kind = KIND_F32 if weight.dtype == torch.float32 else KIND_BF16
    return _lin(kind, weight, None, N, K, round_out)


EMULATED_HALF_ROWS = 8   # the native step's rows: above, a GEMM in an emulated half type runs in fp32


class DenseLinear:
    """F.linear on the weight. A half weight (bf16, fp16) on a CPU that emulates its type
    (native.fast_half false: for bf16 no AMX, no AVX512-BF16; for fp16 no AMX-FP16, no
    AVX512-FP16) computes more than EMULATED_HALF_ROWS rows in fp32, weight and input upcast a
    call, the result rounded to the half type as torch's GEMM rounds it: on an AVX2 EPYC, one
    thread, 3-7x faster than the emulated GEMM from 8 rows on (bf16, SmolLM2-135M's shapes at 32
    rows: 11.6 against 35 ms a layer; 2048 x 2048 at 256 rows: 45 against 312 ms; fp16 alike:
    bench/dense_bf16.py, measured)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()  # [out, in]
        self.out_features = weight.shape[0]
        self.upcast_rows = EMULATED_HALF_ROWS if emulated_half(weight.dtype, weight.device) else NO_ROW_LIMIT

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.upcast_rows * x.shape[-1]:
            return F.linear(x.float(), self.weight.float()).to(x.dtype)
        return F.linear(x, self.weight)

    def native_struct(self, round_out: bool = False):
        return _dense_struct(self.weight, round_out)


class PackedLinear:
    """bf16 weight prepacked for oneDNN (CPU only)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 32):
        self.weight = weight.contiguous()  # kept for copies / inspection
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def native_struct(self, round_out: bool = False):
        return _dense_struct(self.weight, round_out)


@dataclass(frozen=True)
class Int4Blocks:
    """w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]."""
    q: torch.Tensor       # [N, K] uint8, values 0..15
    scale: torch.Tensor   # [N, K/32] float32
    zero: torch.Tensor    # [N, K/32] float32

    def permute_rows(self, index: torch.Tensor) -> "Int4Blocks":
        return Int4Blocks(*(torch.index_select(t, 0, index) for t in (self.q, self.scale, self.zero)))

    @staticmethod
    def cat(parts: list["Int4Blocks"]) -> "Int4Blocks":
        """Stack along the output dimension (fused QKV, gate/up)."""
        return Int4Blocks(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))

    def dequantized(self) -> torch.Tensor:
        N, K = self.q.shape
        q = self.q.float().view(N, K // INT4_GROUP, INT4_GROUP)                 # [N, K/32, 32]
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(N, K)  # float32 [N, K]


class Weights(dict):
    """engine name -> float32 tensor, as a loader reads a model; `.int4`: engine name -> Int4Blocks of
    the weights the file holds as 4-bit groups (a GGUF's Q4_0/Q4_1, a Hugging Face folder's AWQ/GPTQ
    layers), which the model runs on the int4 kernels (make_linear)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.int4: dict[str, Int4Blocks] = {}


class Int4Linear:
    """Weight-only int4 (groups of 32) on the CPU int4 kernel; bf16 activations.

    The kernel's cost grows with the rows (it dequantises per row tile): above `small_batch`
    rows the dense copy takes over when there is one, and without one (efficient mode)
    above `large_batch` rows the weight is dequantised on the fly for one dense matmul.
    With x16 records (native int8 inputs) the int8 kernel runs up to `x16_rows` rows first."""

    small_batch = 8    # up to this many rows the int4 kernel beats the bf16 copy (measured)
    large_batch = 64   # beyond this, dequantise + matmul beats the int4 kernel (measured)

    def __init__(self, blocks: Int4Blocks, compute_dtype: torch.dtype, dense=None):
        N, K = blocks.q.shape
        self.out_features = N
        sz = torch.stack([blocks.scale.t(), blocks.zero.t()], dim=-1)           # [K/32, N, 2]
        self.scales_zeros = sz.to(compute_dtype).contiguous()
        self.dense = dense          # a dense/prepacked copy for large batches, or None
        self.in_features = K
        # the native kernel reads (nibbles, sz [N, K/32, 2]), or with int8 activations the x16
        # records alone; torch's kernel its own packing
        self.native = native.load() is not None and compute_dtype == torch.bfloat16
        self.x16 = self.nibbles = self.sz = None
        self.parts = native.activation_parts() if self.native else 0
        if self.parts:
            sz_n = self.scales_zeros.transpose(0, 1)                            # [N, K/32, 2]
            self.x16 = pack_q4x16(blocks.q, sz_n[..., 0], sz_n[..., 1])          # [N/16, K/32, 320]
        else:
            q = blocks.q.view(N, K // INT4_GROUP, 2, INT4_GROUP // 2)           # [N, K/32, 2, 16]
            self.nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).contiguous()        # [N, K/32, 16] GGUF's bytes
            self.sz = self.scales_zeros.transpose(0, 1).contiguous() if self.native else None
        self.x16_rows = x16_max_rows() if self.x16 is not None else 0
        self.packed = None   # torch's kernel: without native, or for 9..64 rows without a dense copy
        if not self.native or dense is None:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 1)  # [N, K/2]

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype."""
        if self.dense is not None:
            return self.dense.weight
        N, K = self.out_features, self.in_features
        if self.x16 is not None:
            q = unpack_q4x16(self.x16).view(N, K // INT4_GROUP, INT4_GROUP)      # [N, K/32, 32]
        else:
            q = torch.cat([self.nibbles & 0x0F, self.nibbles >> 4], dim=-1)    # [N, K/32, 32]
        sz = self.scales_zeros.transpose(0, 1)                                  # [N, K/32, 2]
        return ((q.to(sz.dtype) - 8) * sz[..., :1] + sz[..., 1:]).view(N, K)

    def native_struct(self, round_out: bool = False):
        if not self.native:
            return None
        N, K = self.out_features, self.in_features
        if self.x16 is not None:
            kind = KIND_Q4X16 + (X16_TWO_PARTS if self.parts == 2 else 0)
            return _lin(kind, self.x16, None, N, K, round_out)
        return _lin(KIND_Q4, self.nibbles, self.sz, N, K, round_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T <= self.x16_rows:
            return native_linear(self, x).to(x.dtype)                          # [T, out]
        if T > self.small_batch and self.dense is not None:
            return self.dense(x)
        if T > self.large_batch:
            return F.linear(x, self.dequantized())
        if self.native and (T <= self.small_batch or self.packed is None):
            return native_linear(self, x).to(x.dtype)                          # [T, out]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, INT4_GROUP,
                                                          self.scales_zeros)  # [T, out]


Q8_CHECK_ROWS = 2048    # rows per piece of Q8Linear's lossless check (a bounded temporary)


class Q8Linear:
    """w ≈ q * scale: q int8 [out, in], one float scale per block of 32 inputs (GGUF Q8_0).

    The native kernel runs up to `small_batch` rows (with x16 records: up to `x16_rows`, see
    x16_max_rows); above, the dense copy when there is one, else the native kernel again
    (efficient keeps no bf16 copy)."""

    small_batch = 8
    logits_f32 = True    # as the lm_head its native path gives float32 logits, not compute_dtype's

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, dense=None):
        N, K = weight.shape
        w = weight.float().view(N, K // INT4_GROUP, INT4_GROUP)                 # [N, K/32, 32]
        # one float32 temporary, its ops in place: a tied lm_head is the vocabulary x hidden (113 MB
        # for SmolLM2-135M), and each fresh copy of it cost more CPU in page faults than its op
        q = w.abs()
        scale = q.amax(dim=-1) / 127.0                                          # [N, K/32]
        torch.div(w, scale.clamp(min=1e-30)[..., None], out=q).round_().clamp_(-127, 127)
        self.lossless = all(torch.equal(q[i:i + Q8_CHECK_ROWS] * scale[i:i + Q8_CHECK_ROWS, :, None],
                                        w[i:i + Q8_CHECK_ROWS])                # the file was Q8_0
                            for i in range(0, N, Q8_CHECK_ROWS))
        self.qweight = q.to(torch.int8).view(N, K).contiguous()
        self.scale = scale.contiguous()
        self.out_features, self.compute_dtype, self.dense = N, compute_dtype, dense
        self.parts = native.activation_parts() if native.load() is not None else 0
        self.x16 = pack_q8x16(self.qweight, self.scale) if self.parts else None
        self.x16_rows = x16_max_rows() if self.x16 is not None else 0

    def dequantized(self) -> torch.Tensor:
        N, K = self.qweight.shape
        q = self.qweight.view(N, K // INT4_GROUP, INT4_GROUP).to(self.compute_dtype)
        return (q * self.scale[..., None].to(self.compute_dtype)).view(N, K)

    def native_struct(self, round_out: bool = False):
        N, K = self.qweight.shape
        if self.x16 is not None:
            kind = KIND_Q8X16 + (X16_TWO_PARTS if self.parts == 2 else 0)
            return _lin(kind, self.x16, None, N, K, round_out)
        return _lin(KIND_Q8, self.qweight, self.scale, N, K, round_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > max(self.small_batch, self.x16_rows):
            return self.dense(x)                                               # compute bound: oneDNN
        if native.load() is not None:                # alone (efficient): 16 rows a pass, never a bf16 copy
            return native_linear(self, x)                                      # [T, out] float32
        return F.linear(x, self.dequantized())


class Int8Linear:
    """Weight-only int8: w ≈ q * scale[:, None], q int8 [out, in], scale [out] in the compute dtype
    (absmax / 127 as that dtype holds it; q rounded against it: within half a step of w)."""

    small_batch = 8  # up to this many rows the int8 kernel beats dequantise + matmul

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        w = weight.float()
        # the scale as it is kept (in the compute dtype: bf16 rounds absmax / 127 by up to 2^-9), and
        # each weight rounded against that one, so q * scale is within half a step of the weight
        self.scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(compute_dtype)   # [out]
        kept = self.scale.float().clamp(min=torch.finfo(torch.float32).tiny)          # 0: an underflowed fp16 scale
        self.qweight = torch.round(w / kept[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.compute_dtype = compute_dtype
        self.out_features = weight.shape[0]
        # the int8 kernel on CPU is fast for bf16/fp16 activations only
        self.use_kernel = compute_dtype in (torch.bfloat16, torch.float16) and _int8_kernel_works(compute_dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.compute_dtype) * self.scale[:, None]  # [out, in]

    def native_struct(self, round_out: bool = False):
        N, K = self.qweight.shape
        if K % INT4_GROUP:
            return None
        if getattr(self, "_block_scale", None) is None:   # per channel = the same scale in every block
            self._block_scale = self.scale.float()[:, None].expand(N, K // INT4_GROUP).contiguous()
        return _lin(KIND_Q8, self.qweight, self._block_scale, N, K, round_out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.shape[0] <= self.small_batch:
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self.scale)
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale  # [T, out]


_KERNEL_OK: dict = {}


def _int8_kernel_works(dtype: torch.dtype) -> bool:
    if dtype not in _KERNEL_OK:
        try:
            x = torch.ones(1, 32, dtype=dtype)
            q = torch.ones(8, 32, dtype=torch.int8)
            y = torch.ops.aten._weight_int8pack_mm(x, q, torch.ones(8, dtype=dtype))
            _KERNEL_OK[dtype] = bool(torch.allclose(y.float(), torch.full((1, 8), 32.0)))
        except (RuntimeError, NotImplementedError):
            _KERNEL_OK[dtype] = False
    return _KERNEL_OK[dtype]


_PACK_OK: dict = {}


def packing_works() -> bool:
    """Whether oneDNN prepacked bf16 linear runs (and agrees with F.linear) here."""
    if "bf16" not in _PACK_OK:
        try:
            w = torch.randn(16, 32).bfloat16()
            x = torch.randn(3, 32).bfloat16()
            y = PackedLinear(w)(x)
            _PACK_OK["bf16"] = bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=1e-1, rtol=1e-2))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PACK_OK["bf16"] = False
    return _PACK_OK["bf16"]


_INT4_OK: dict = {}


def int4_kernel_works() -> bool:
    """Whether the CPU int4 kernel runs here and agrees with the dequantised weight (within 2 % of
    the outputs' scale: a broken kernel is off by far more, int8 inputs by under 1 %)."""
    if "cpu" not in _INT4_OK:
        try:
            g = torch.Generator().manual_seed(0)
            b = Int4Blocks(torch.randint(0, 16, (16, 64), generator=g).to(torch.uint8),
                           torch.rand(16, 2, generator=g), torch.randn(16, 2, generator=g))
            x = torch.randn(3, 64, generator=g).bfloat16()
            y = Int4Linear(b, torch.bfloat16)(x).float()
            ref = x.float() @ b.dequantized().t()
            _INT4_OK["cpu"] = bool(torch.allclose(y, ref, atol=0.02 * float(ref.abs().max()), rtol=0.02))
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT4_OK["cpu"] = False
    return _INT4_OK["cpu"]


def _dtype_word(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def linear_runs(lin) -> tuple[str, str, str]:
    """What the linear `lin` is and what computes it: (its weights' form, what runs steps of up to
    8 rows, what runs more rows), in words for the startup line (LlamaModel.linears_text)."""
    if isinstance(lin, Int4Linear):
        if lin.x16 is not None:
            small = f"agp's int8 kernels ({native.int8_isa()})"
        else:
            small = "agp's int4 kernel" if lin.native else "torch's int4 kernel"
        if lin.x16_rows >= NO_ROW_LIMIT:
            return "4-bit block", small, small
        dt = _dtype_word(lin.scales_zeros.dtype)
        large = (linear_runs(lin.dense)[2] if lin.dense is not None else
                 f"torch's int4 kernel, {dt} GEMMs (dequantised a call) past {lin.large_batch} rows")
        return "4-bit block", small, large
    if isinstance(lin, Int8Linear):
        dequantised = f"torch's {_dtype_word(lin.compute_dtype)} GEMMs (dequantised a call)"
        return "int8 per-channel", "torch's int8 kernel" if lin.use_kernel else dequantised, dequantised
    dt = _dtype_word(lin.weight.dtype)
    if isinstance(lin, PackedLinear):
        gemm = f"oneDNN's {'' if native.fast_bf16() else 'emulated '}{dt} GEMMs"
    else:
        gemm = f"torch's {'emulated ' if emulated_half(lin.weight.dtype, lin.weight.device) else ''}{dt} GEMMs"
    large = "torch's float32 GEMMs" if getattr(lin, "upcast_rows", NO_ROW_LIMIT) < NO_ROW_LIMIT else gemm
    return f"dense {dt}", gemm, large


def make_linear(weight: torch.Tensor, kind: str, dtype: torch.dtype, device: torch.device,
                int4: Int4Blocks | None = None):
    """kind: 'dense' | 'int8'. bf16 on CPU gets prepacked when oneDNN supports it.
    int4: the file's own 4-bit blocks of this weight; on CPU with bf16 compute they run
    the int4 kernel for small batches (dense kind: with a bf16 copy for large ones;
    int8 kind: alone, no other copy)."""
    use_int4 = (int4 is not None and device.type == "cpu" and dtype == torch.bfloat16
                and int4.q.shape[0] % 16 == 0 and int4.q.shape[1] % INT4_GROUP == 0 and int4_kernel_works())
    if kind == "int8":
        return Int4Linear(int4, dtype) if use_int4 else Int8Linear(weight.to(device), dtype)
    w = weight.to(device=device, dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16 and packing_works():
        dense = PackedLinear(w)
    else:
        dense = DenseLinear(w)
    return Int4Linear(int4, dtype, dense) if use_int4 else dense
