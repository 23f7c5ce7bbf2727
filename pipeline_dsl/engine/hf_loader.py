"""Hugging Face folder -> LlamaConfig + float32 weights in the engine's naming.

A folder with config.json (a llama-family `model_type`), one or more *.safetensors files
and tokenizer.json (read by tokenizer.py). Names are mapped to the engine's:

    model.embed_tokens.weight                    -> embed
    model.norm.weight                            -> norm
    lm_head.weight                               -> lm_head (absent when tied)
    model.layers.N.input_layernorm.weight        -> layers.N.attn_norm
    model.layers.N.self_attn.{q,k,v,o}_proj      -> layers.N.{q,k,v,o}
    model.layers.N.post_attention_layernorm      -> layers.N.ffn_norm
    model.layers.N.mlp.{gate,up,down}_proj       -> layers.N.{gate,up,down}

HF checkpoints keep the "rotate half" Q/K layout the model uses, so nothing is permuted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .model import LlamaConfig

_LLAMA_TYPES = {"llama", "mistral", "smollm", "smollm2"}
_PARTS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
}


class HFModelError(ValueError):
    """The folder is not a llama-family safetensors checkpoint this engine can run."""


@dataclass(frozen=True)
class HFModel:
    config: LlamaConfig
    weights: dict          # engine name -> float32 torch.Tensor


def read_config(folder: Path) -> LlamaConfig:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise HFModelError(f"{path}: cannot read the model config ({e})") from e
    if cfg.get("model_type") not in _LLAMA_TYPES:
        raise HFModelError(f"{path}: model_type {cfg.get('model_type')!r} is not a llama-family decoder")
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise HFModelError(f"{path}: rope_scaling {scaling!r} is not supported")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def load_hf_folder(folder: str | Path) -> HFModel:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFModelError(f"{folder}: no *.safetensors weights")
    weights = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            mapped = _engine_name(name)
            if mapped is not None:
                weights[mapped] = t.float()
    if "lm_head" not in weights and not config.tie_embeddings:
        config = LlamaConfig(**{**config.__dict__, "tie_embeddings": True})
    need = ["embed", "norm"] + [f"layers.{i}.{p}" for i in range(config.num_layers) for p in _PARTS.values()]
    missing = [n for n in need if n not in weights]
    if missing:
        raise HFModelError(f"{folder}: missing weights {missing[:4]}")
    return HFModel(config=config, weights=weights)


def _engine_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "model.norm.weight":
        return "norm"
    if name == "lm_head.weight":
        return "lm_head"
    if name.startswith("model.layers.") and name.endswith(".weight"):
        rest = name[len("model.layers."):-len(".weight")]
        idx, _, part = rest.partition(".")
        if part in _PARTS:
            return f"layers.{idx}.{_PARTS[part]}"
    return None
