"""GGUF -> LlamaConfig + float32 weights in the engine's naming.

Reads a llama-architecture GGUF file with the `gguf` package (GGUFReader), dequantises
every tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants, through
`gguf.quants.dequantize`) to float32 and renames it:

    token_embd.weight        -> embed                 [vocab, hidden]
    output_norm.weight       -> norm                  [hidden]
    output.weight            -> lm_head (if untied)   [vocab, hidden]
    blk.N.attn_norm.weight   -> layers.N.attn_norm    [hidden]
    blk.N.attn_q/k/v/output  -> layers.N.q/k/v/o      [out, in]
    blk.N.ffn_norm.weight    -> layers.N.ffn_norm     [hidden]
    blk.N.ffn_gate/up/down   -> layers.N.gate/up/down [out, in]

llama.cpp's converter permutes the rows of Q and K of each head (it interleaves the two
rotary halves); `unpermute_qk` undoes it so that the model can use the usual
"rotate half" RoPE of the Hugging Face checkpoints.

The weights that the file stores as Q4_0/Q4_1 are also kept as their raw 4-bit blocks
(`weights.int4[name]`, an `Int4Blocks`, rows unpermuted like the float copy): the model
can run them with the CPU int4 kernel, losslessly relative to the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import LlamaConfig
from .quant import Int4Blocks

_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
    "attn_output": "o", "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up",
    "ffn_down": "down",
}


class Weights(dict):
    """engine name -> float32 tensor; `.int4`: engine name -> Int4Blocks for 4-bit tensors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.int4: dict[str, Int4Blocks] = {}


class GGUFError(ValueError):
    """The file is not a GGUF model this engine can run."""


@dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    weights: dict            # engine name -> float32 torch.Tensor (a Weights: .int4 as well)
    metadata: dict           # key -> python value (big token arrays included)


def read_metadata(reader) -> dict:
    """Every key/value field of the file as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic field type: skip it rather than fail the load
            continue
    return meta


def config_from_metadata(meta: dict, *, vocab_size: int | None = None, tied: bool = True) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"unsupported architecture {arch!r}: this engine runs llama-family models")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks 'llama.{key}'")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    vocab = vocab_size or int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(meta.get("llama.context_length", 2048)),
        tie_embeddings=tied,
    )


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


def dequantize(tensor) -> np.ndarray:
    """One ReaderTensor as float32, numpy shape [rows, cols] (GGUF lists dims reversed)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order
    kind = tensor.tensor_type
    if kind == Q.F32:
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            data = quants.dequantize(tensor.data, kind)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {tensor.name}: type {kind.name} is not supported") from e
    return np.array(data.reshape(shape), dtype=np.float32)  # a writable copy (not the memmap)


def int4_blocks(tensor) -> Int4Blocks | None:
    """The raw blocks of a Q4_0/Q4_1 tensor as Int4Blocks (None for other types).

    A block of 32 weights: Q4_1 = d f16, m f16, 16 bytes of nibbles (w = q*d + m);
    Q4_0 = d f16, 16 bytes (w = (q-8)*d). Byte j holds element j (low nibble) and
    element j+16 (high nibble). With Int4Blocks' (q-8)*scale + zero: scale = d,
    zero = m + 8d (Q4_1) or 0 (Q4_0)."""
    from gguf import GGMLQuantizationType as Q

    kind = tensor.tensor_type
    if kind not in (Q.Q4_0, Q.Q4_1):
        return None
    rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
    head = 4 if kind == Q.Q4_1 else 2
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // 32, head + 16)  # [N, K/32, bytes]
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)            # [N, K/32]
    if kind == Q.Q4_1:
        zero = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    else:
        zero = np.zeros_like(d)
    qs = raw[..., head:]                                                             # [N, K/32, 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)            # [N, K] in 0..15
    return Int4Blocks(torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy(d), torch.from_numpy(zero))


def load_gguf(path: str | Path) -> GGUFModel:
    """Read a llama GGUF file: config, float32 weights (Q/K unpermuted), metadata."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    vocab = None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            vocab = int(t.shape[-1])
    config = config_from_metadata(meta, vocab_size=vocab, tied=tied)

    weights = Weights()
    for t in reader.tensors:
        name = _engine_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: not used by the plain llama RoPE
        w = dequantize(t)
        blocks = int4_blocks(t)
        heads = {".q": config.num_heads, ".k": config.num_kv_heads}.get(name[-2:])
        if heads:
            w = unpermute_qk(w, heads)
            if blocks is not None:
                blocks = blocks.permute_rows(torch.from_numpy(unpermute_qk(np.arange(w.shape[0]), heads)))
        weights[name] = torch.from_numpy(w)
        if blocks is not None and name != "embed":
            weights.int4[name] = blocks
    _check_complete(weights, config, path)
    return GGUFModel(config=config, weights=weights, metadata=meta)


def _engine_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "embed"
    if gguf_name == "output_norm.weight":
        return "norm"
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _check_complete(weights: dict, config: LlamaConfig, path: Path) -> None:
    need = ["embed", "norm"] + [
        f"layers.{i}.{n}" for i in range(config.num_layers) for n in _LAYER_NAMES.values()
    ]
    missing = [n for n in need if n not in weights]
    if missing:
        raise GGUFError(f"{path}: missing tensors {missing[:4]}{' …' if len(missing) > 4 else ''}")
