"""The quantized linear layers of a Hugging Face folder (AWQ, GPTQ, compressed-tensors' pack-quantized;
layouts and checks in model_files/quantized.py) -> the float32 weight [out, in], and where the file's
groups fit the engine's int4 blocks, those blocks too (quant.Int4Blocks).

Every layer is dequantized at load, w[n, k] = (q - z) * s, as the checkpoint defines it (the
codes and zeros are small integers; with fp16 or bf16 scales their differences and products are
exact in float32, with fp32 scales — compressed-tensors allows them — the product is float32's).
The layers whose codes are 4-bit, in groups of a multiple of 32 consecutive inputs (or one group
per column), without act order (g_idx is k // group), and whose scales are fp16 or bf16, are also
kept as `Int4Blocks`: a group of 128 is 4 blocks of 32 with its scale s and zero (8 - z) * s,
which the int4 kernels run as they run a GGUF's Q4_1 blocks (models.LlamaModel,
quant.make_linear): `(q - 8) * s + (8 - z) * s` is `(q - z) * s` exactly for those scales.
"""

from __future__ import annotations

import torch

from pipeline_dsl.model_files.quantized import QuantSpec

from .quant import INT4_GROUP, Int4Blocks

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)    # output column 8c + AWQ_ORDER[i] sits in nibble i of int32 c


def _codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., M] -> int16 [..., M, 32/bits]: field i of each int32 (lowest bits first)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.int16)


def _plus_ones(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words + 0x11111111 (0x01010101 for 8 bits), wrapping as int32 does: one added to every
    field, a carry going on into the next field (GPTQModel's v1 -> v2 conversion)."""
    ones = sum(1 << f for f in range(0, 32, bits))
    word = (packed.to(torch.int64) + ones) & 0xFFFFFFFF
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def _along_outputs(packed: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """An int32 [R, N/p] packed along the outputs -> int16 [R, N] in column order."""
    q = _codes(packed, spec.bits)                                  # [R, N/p, p]
    if spec.method == "awq":                                       # nibble i holds column AWQ_ORDER[i]
        q = q[..., list(torch.argsort(torch.tensor(AWQ_ORDER)))]
    return q.reshape(q.shape[0], -1)


def _compressed_tensors(spec: QuantSpec, t: dict):
    """compressed-tensors' tensors in unpack's form: its codes and zeros are stored plus 2^(bits-1),
    so (q - z) of the stored values is the scheme's; a symmetric scheme's zero is that offset."""
    q = _codes(t["qweight"], spec.bits)                            # [N, K/p, p]: consecutive inputs
    N = q.shape[0]
    q = q.reshape(N, -1).t()                                       # [K, N]
    s = t["scales"].float().t()                                    # [G, N]
    if spec.zero_point:
        z = _codes(t["qzeros"], spec.bits)                         # [N/p, G, p]: consecutive outputs
        z = z.permute(1, 0, 2).reshape(z.shape[1], -1)             # [G, N]
    else:
        z = torch.full(s.shape, 1 << (spec.bits - 1), dtype=torch.int16)
    return q, z, s


def _group(spec: QuantSpec, K: int) -> int:
    """Inputs per group of a layer of K inputs (group_size -1: one group per column)."""
    return spec.group_size if spec.group_size != -1 else K


def unpack(spec: QuantSpec, t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int16 [K, N], zeros int16 [G, N], scales float32 [G, N], group of each input int64 [K])
    of one layer's tensors `t` (role -> tensor, shapes checked by model_files.quantized)."""
    if spec.method == "compressed-tensors":
        q, z, s = _compressed_tensors(spec, t)
        if "shape" in t and t["shape"].tolist() != [q.shape[1], q.shape[0]]:
            raise ValueError(f"its weight_shape {t['shape'].tolist()} is not the [{q.shape[1]}, {q.shape[0]}] "
                             f"that weight_packed unpacks to")
    else:
        if spec.method == "awq":
            q = _along_outputs(t["qweight"], spec)                 # [K, N]
        else:                                                      # packed along the inputs
            q = _codes(t["qweight"], spec.bits)                    # [K/p, N, p]
            q = q.permute(0, 2, 1).reshape(-1, q.shape[1])         # [K, N]
        qzeros = t["qzeros"]
        if spec.zeros_minus_one:   # GPTQ v1 stores z - 1, the whole word less 0x11111111 (GPTQModel's
            qzeros = _plus_ones(qzeros, spec.bits)   # form): a zero of 0 borrows from the next field
        z = _along_outputs(qzeros, spec)                           # [G, N]
        s = t["scales"].float()
    K = q.shape[0]
    g_idx = t.get("g_idx")
    return q, z, s, (g_idx.long() if g_idx is not None else torch.arange(K) // _group(spec, K))


def dequantize(spec: QuantSpec, t: dict, name: str = "") -> tuple[torch.Tensor, Int4Blocks | None]:
    """(float32 weight [N, K], Int4Blocks or None) of one quantized layer; a g_idx naming a group
    the layer has not is a ValueError naming the tensor."""
    try:
        q, z, s, g = unpack(spec, t)
    except ValueError as e:
        raise ValueError(f"layer '{name}': {e}") from None
    K, N = q.shape
    if g.shape != (K,) or (K and (int(g.min()) < 0 or int(g.max()) >= s.shape[0])):
        raise ValueError(f"the g_idx of layer '{name}' names groups outside its {s.shape[0]}")
    w = ((q - z[g]).float() * s[g]).t().contiguous()               # [N, K]
    blocks = None
    group = _group(spec, K)
    # (q - 8) * s + (8 - z) * s is (q - z) * s exactly for fp16 and bf16 scales (11 significant bits or
    # fewer, times a code of 5): with fp32 scales, whose products round, the dequantized weight alone
    if spec.bits == 4 and group % INT4_GROUP == 0 and K % group == 0 \
            and t["scales"].dtype in (torch.float16, torch.bfloat16) \
            and torch.equal(g, torch.arange(K) // group):          # act order: inputs not in runs of 32
        per = group // INT4_GROUP
        scale = s.t().repeat_interleave(per, dim=1)                # [N, K/32]
        zero = ((8 - z).float() * s).t().repeat_interleave(per, dim=1)
        blocks = Int4Blocks(q.t().to(torch.uint8).contiguous(), scale.contiguous(), zero.contiguous())
    return w, blocks
