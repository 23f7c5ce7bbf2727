"""GGUF -> LlamaConfig + float32 weights in the engine's naming.

The header (metadata and tensor infos) is parsed and checked by
`pipeline_dsl.model_files` before any tensor data is touched: a truncated, corrupt or
absurd file, a missing llama key, an unsupported tensor type or a tensor whose shape does
not fit the config is a `GGUFError` naming the file and the problem. Tensor data is then
memory-mapped, and every tensor dequantised (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
and the K-quants, through `gguf.quants.dequantize`) to float32 and renamed:

    token_embd.weight        -> embed                 [vocab, hidden]
    output_norm.weight       -> norm                  [hidden]
    output.weight            -> lm_head (if untied)   [vocab, hidden]
    blk.N.attn_norm.weight   -> layers.N.attn_norm    [hidden]
    blk.N.attn_q/k/v/output  -> layers.N.q/k/v/o      [out, in]
    blk.N.attn_q/k/v.bias    -> layers.N.q/k/v_bias   [out] (qwen2)
    blk.N.attn_q/k_norm      -> layers.N.q/k_norm     [head_dim] (qwen3)
    blk.N.ffn_norm.weight    -> layers.N.ffn_norm     [hidden]
    blk.N.ffn_gate/up/down   -> layers.N.gate/up/down [out, in]
    blk.N.attn_qkv           -> layers.N.q/k/v        (phi3: split, engine/phi3.py)
    blk.N.ffn_up             -> layers.N.gate/up      (phi3: gate | up in one, split)
    rope_factors_short/long  -> config.rope_scaling   [rotary dims/2] (phi3's longrope: the one its context takes)
    blk.N.post_attention_norm, post_ffw_norm -> layers.N.post_attn_norm, post_ffw_norm [hidden] (gemma3)
    rope_freqs.weight        -> config.rope_scaling   [head_dim/2] (Llama 3.1+'s rotary factors)

The architectures are model_files.GGUF_ARCHITECTURES: `llama`, `qwen2` (llama with biases
on Q, K and V; its keys are spelt `qwen2.block_count`, …), `qwen3` (llama with an RMSNorm
over each head of Q and K before RoPE), `phi3` (Q/K/V and gate/up fused, a partial rotary,
longrope: model_files/phi3.py) and `gemma3` (Gemma 3's text model, engine/gemma.py: its
norms stored as 1 + w already, as llama.cpp's converter writes them). llama.cpp's converter permutes the rows of a llama's
Q and K of each head (it interleaves the two rotary halves; a qwen2's, qwen3's, phi3's or gemma3's it leaves as
they are, its rotary is NeoX's halves); `unpermute_qk` undoes it so that the model
can use the usual "rotate half" RoPE of the Hugging Face checkpoints.

The weights that the file stores as Q4_0/Q4_1 are also kept as their raw 4-bit blocks
(`weights.int4[name]`, an `Int4Blocks`, rows unpermuted like the float copy): the model
can run them with the CPU int4 kernel, losslessly relative to the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline_dsl.model_files import (GGML_TYPES, GGUF_ARCHITECTURES, GGUFHeader, ModelFileProblem,
                                      gguf_engine_name, gguf_llama_config, gguf_used_keys, read_gguf_header)
from pipeline_dsl.model_files.phi3 import gguf_factor_tensor

from .model import LlamaConfig
from .quant import Int4Blocks, Weights

log = logging.getLogger("agp.model")


class GGUFError(ModelFileProblem):
    """The file is not a GGUF model this engine can run: `GGUFError(path, problem)`."""


@dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    weights: dict            # engine name -> float32 torch.Tensor (a Weights: .int4 as well)
    metadata: dict           # key -> python value (big token arrays included)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file, its data memory-mapped (the layout of gguf's ReaderTensor)."""

    name: str
    tensor_type: object      # gguf.GGMLQuantizationType
    shape: tuple             # numpy order: [rows, cols]
    data: np.ndarray         # F32/F16: the values [shape]; others: raw blocks [rows, bytes per row]


def read_metadata(header: GGUFHeader) -> dict:
    """The file's metadata as plain Python values. A value that cannot be read (a string
    that is not UTF-8) is an error when the engine reads that key; the others are left out
    with one warning (logger `agp.model`) that lists them."""
    used = gguf_used_keys(header.metadata.get("general.architecture", "llama"))
    for key, why in header.unreadable.items():
        if key in used:
            raise GGUFError(header.path, f"metadata {key!r} cannot be read: {why}")
    if header.unreadable:
        log.warning("%s: %d metadata field(s) cannot be read and are ignored: %s", header.path,
                    len(header.unreadable), "; ".join(f"{k} ({why})" for k, why in header.unreadable.items()))
    return dict(header.metadata)


def config_from_metadata(header: GGUFHeader) -> LlamaConfig:
    """The checked LlamaConfig of a llama-family GGUF header (raises GGUFError)."""
    try:
        return LlamaConfig(**gguf_llama_config(header))
    except ModelFileProblem as e:
        raise GGUFError(e.path, e.problem) from None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K weight [n_heads*head_dim, in]."""
    out, rest = w.shape[0], w.shape[1:]
    # [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in]: pairs back to halves
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_qk`), used to write GGUF files."""
    out, rest = w.shape[0], w.shape[1:]
    # [heads, 2, head_dim/2, in] -> [heads, head_dim/2, 2, in]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


DEQUANT_ROWS = 1024     # rows per call: bounded temporaries (a few float32 copies of 1024 rows)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """One tensor as float32 [rows, cols] (a writable copy, not the memmap)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if tensor.tensor_type == Q.F32:
        data = tensor.data
    elif (kind := getattr(quants, tensor.tensor_type.name, None)) is not None and hasattr(kind, "dequantize_rows"):
        # the type's own block formula over many rows per call: gguf's `dequantize` calls it on
        # 16 rows at a time, and that Python loop was most of a GGUF's load time
        rows = tensor.data.reshape(-1, tensor.data.shape[-1])                    # [rows, bytes per row]
        out = np.empty((rows.shape[0], tensor.shape[-1]), dtype=np.float32)       # [rows, cols]
        kind.init_grid()
        for i in range(0, rows.shape[0], DEQUANT_ROWS):
            out[i:i + DEQUANT_ROWS] = kind.dequantize_rows(rows[i:i + DEQUANT_ROWS])
        return out.reshape(tensor.shape)
    else:
        data = quants.dequantize(tensor.data, tensor.tensor_type)  # NotImplementedError: an exotic type
    return np.array(data.reshape(tensor.shape), dtype=np.float32)


def read_tensors(path: Path, header: GGUFHeader):
    """GGUFTensor of every tensor in the (checked) header, over one memmap of the file."""
    from gguf import GGMLQuantizationType as Q

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for info in header.tensors:
        start = header.data_offset + info.offset
        raw = mm[start:start + info.nbytes]                          # [nbytes]
        kind, shape = Q(info.type), info.shape
        if kind == Q.F32:
            data = raw.view(np.float32).reshape(shape)
        elif kind == Q.F16:
            data = raw.view(np.float16).reshape(shape)
        else:                                                        # [.., rows, bytes per row]
            _, block, block_bytes = GGML_TYPES[info.type]
            data = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
        yield GGUFTensor(info.name, kind, shape, data)


def int4_blocks(tensor) -> Int4Blocks | None:
    """The raw blocks of a Q4_0/Q4_1 tensor as Int4Blocks (None for other types).

    A block of 32 weights: Q4_1 = d f16, m f16, 16 bytes of nibbles (w = q*d + m);
    Q4_0 = d f16, 16 bytes (w = (q-8)*d). Byte j holds element j (low nibble) and
    element j+16 (high nibble). With Int4Blocks' (q-8)*scale + zero: scale = d,
    zero = m + 8d (Q4_1) or 0 (Q4_0)."""
    parts = int4_parts(tensor)
    return None if parts is None else blocks_of(*parts)


def int4_parts(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """A Q4_0/Q4_1 tensor's nibbles q [N, K] uint8 0..15 (element order), d [N, K/32] float32 and
    m [N, K/32] float32 (Q4_1; None for Q4_0), unpacked once for both of the loader's forms of it
    (int4_blocks' and dequantize_int4's); None for other types."""
    from gguf import GGMLQuantizationType as Q

    kind = tensor.tensor_type
    if kind not in (Q.Q4_0, Q.Q4_1):
        return None
    rows, cols = tensor.shape
    head = 4 if kind == Q.Q4_1 else 2
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // 32, head + 16)  # [N, K/32, bytes]
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)            # [N, K/32]
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == Q.Q4_1 else None
    qs = raw[..., head:]                                                             # [N, K/32, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)            # [N, K] in 0..15
    return q, d, m


def blocks_of(q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> Int4Blocks:
    """int4_parts' pieces as Int4Blocks ((q-8)*scale + zero)."""
    zero = m + 8 * d if m is not None else np.zeros_like(d)
    return Int4Blocks(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d), torch.from_numpy(zero))


def dequantize_int4(q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """int4_parts' pieces as float32 [N, K]: gguf's own formulas (Q4_1: d*q + m; Q4_0: d*(q-8)),
    the same floats bit for bit as dequantize, without unpacking the nibbles a second time."""
    rows, cols = q.shape
    out = np.empty((rows, cols // 32, 32), dtype=np.float32)                        # [N, K/32, 32]
    q3 = q.reshape(rows, cols // 32, 32)
    for i in range(0, rows, DEQUANT_ROWS):
        part = out[i:i + DEQUANT_ROWS]
        if m is None:
            np.subtract(q3[i:i + DEQUANT_ROWS], 8, out=part, dtype=np.float32)
        else:
            part[...] = q3[i:i + DEQUANT_ROWS]
        np.multiply(d[i:i + DEQUANT_ROWS, :, None], part, out=part)
        if m is not None:
            np.add(part, m[i:i + DEQUANT_ROWS, :, None], out=part)
    return out.reshape(rows, cols)


def load_gguf(path: str | Path) -> GGUFModel:
    """Read a llama-family GGUF file: config, float32 weights (Q/K unpermuted where llama.cpp
    permuted them), metadata."""
    path = Path(path)
    try:
        header = read_gguf_header(path)
    except ModelFileProblem as e:
        raise GGUFError(e.path, e.problem) from None
    meta = read_metadata(header)
    config = config_from_metadata(header)   # names, shapes and types of the tensors checked too
    arch = meta["general.architecture"]
    permuted = GGUF_ARCHITECTURES[arch][1]
    longrope = gguf_factor_tensor(config.rope_scaling)   # phi3: the factors' tensor for its context

    weights = Weights()
    for t in read_tensors(path, header):
        if t.name == "rope_freqs.weight":   # Llama 3.1+'s rotary scaling, as llama.cpp writes it
            factors = tuple(float(f) for f in dequantize(t).reshape(-1))   # [head_dim/2]
            if not all(0 < f < float("inf") for f in factors):
                raise GGUFError(path, "tensor 'rope_freqs.weight' holds a factor that is not a positive number")
            config = replace(config, rope_scaling=(*config.rope_scaling, ("factors", factors)))
            continue
        if t.name == longrope:              # phi3: its short or long factors, the one the context takes
            factors = tuple(float(f) for f in dequantize(t).reshape(-1))   # [rotary dims/2]
            if not all(0 < f < float("inf") for f in factors):
                raise GGUFError(path, f"tensor {t.name!r} holds a factor that is not a positive number")
            config = replace(config, rope_scaling=tuple(
                (k, factors if k == "factors" else v) for k, v in config.rope_scaling))
            continue
        name = gguf_engine_name(t.name, arch)
        if name is None or (name.startswith("layers.") and int(name.split(".")[1]) >= config.num_layers):
            continue  # a tensor the llama decoder does not use
        parts = int4_parts(t)       # a 4-bit tensor's nibbles, unpacked once for both forms
        try:
            w = dequantize(t) if parts is None else dequantize_int4(*parts)
        except NotImplementedError as e:
            raise GGUFError(path, f"tensor {t.name!r}: type {t.tensor_type.name} is not supported") from e
        blocks = blocks_of(*parts) if parts is not None else None
        heads = {".q": config.num_heads, ".k": config.num_kv_heads}.get(name[-2:])
        if heads and permuted:
            w = unpermute_qk(w, heads)
            if blocks is not None:
                blocks = blocks.permute_rows(torch.from_numpy(unpermute_qk(np.arange(w.shape[0]), heads)))
        weights[name] = torch.from_numpy(w)
        if blocks is not None and name != "embed":
            weights.int4[name] = blocks
    if config.fused:                        # phi3: attn_qkv and ffn_up (gate | up) split (engine/phi3.py)
        from .phi3 import split_fused
        split_fused(config, weights)
    return GGUFModel(config=config, weights=weights, metadata=meta)
