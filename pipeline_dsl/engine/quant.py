"""Linear layers as callables: dense, oneDNN-prepacked bf16, and int8 weight-only.

A model weight is turned once, at load time, into one of these; the forward pass only
calls `layer(x)` with x [T, in] -> [T, out].

- `DenseLinear`: `F.linear` on a contiguous [out, in] weight (fp32, fp16, CUDA).
- `PackedLinear`: the weight reordered once into oneDNN's blocked layout and run with
  `mkldnn._linear_pointwise` — on CPUs with AMX/AVX512-bf16 this is about 2x faster
  than `F.linear`, which reorders the weight on every call.
- `Int8Linear`: int8 weights with one scale per output channel (symmetric, absmax/127).
  Small batches use `aten._weight_int8pack_mm` (reads 1 byte per weight: fastest when
  memory bound); larger ones dequantise on the fly and run a dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()  # [out, in]
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PackedLinear:
    """bf16 weight prepacked for oneDNN (CPU only)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 32):
        self.weight = weight.contiguous()  # kept for copies / inspection
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class Int8Linear:
    """Weight-only int8: w ≈ q * scale[:, None], q int8 [out, in], scale [out]."""

    small_batch = 8  # up to this many rows the int8 kernel beats dequantise + matmul

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.out_features = weight.shape[0]
        # the int8 kernel on CPU is fast for bf16/fp16 activations only
        self.use_kernel = compute_dtype in (torch.bfloat16, torch.float16) and _int8_kernel_works(compute_dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.compute_dtype) * self.scale[:, None]  # [out, in]

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


def make_linear(weight: torch.Tensor, kind: str, dtype: torch.dtype, device: torch.device):
    """kind: 'dense' | 'int8'. bf16 on CPU gets prepacked when oneDNN supports it."""
    if kind == "int8":
        return Int8Linear(weight.to(device), dtype)
    w = weight.to(device=device, dtype=dtype)
    if device.type == "cpu" and dtype == torch.bfloat16 and packing_works():
        return PackedLinear(w)
    return DenseLinear(w)
