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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import LlamaConfig

_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
    "attn_output": "o", "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up",
    "ffn_down": "down",
}


class GGUFError(ValueError):
    """The file is not a GGUF model this engine can run."""


@dataclass(frozen=True)
class GGUFModel:
    config: LlamaConfig
    weights: dict            # engine name -> float32 torch.Tensor
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

    weights = {}
    for t in reader.tensors:
        name = _engine_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: not used by the plain llama RoPE
        w = dequantize(t)
        if name.endswith(".q"):
            w = unpermute_qk(w, config.num_heads)
        elif name.endswith(".k"):
            w = unpermute_qk(w, config.num_kv_heads)
        weights[name] = torch.from_numpy(w)
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
