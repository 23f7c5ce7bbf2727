"""Write a random PEFT LoRA adapter folder for the tiny test model (tiny_model.TINY), as PEFT saves
one: adapter_config.json and adapter_model.safetensors with PEFT's key names.

    from tiny_lora import write_tiny_lora
    folder = write_tiny_lora(tmp_path / "a", seed=1, r=4, alpha=8, strength=1.0)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_model import TINY

PREFIX = "base_model.model.model.layers"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_shape(module: str, cfg: dict = TINY) -> tuple[int, int]:
    """(out, in) of a targeted linear of the tiny model."""
    h, hd = cfg["hidden"], cfg["hidden"] // cfg["heads"]
    return {"q_proj": (h, h), "k_proj": (cfg["kv_heads"] * hd, h), "v_proj": (cfg["kv_heads"] * hd, h),
            "o_proj": (h, h), "gate_proj": (cfg["ffn"], h), "up_proj": (cfg["ffn"], h),
            "down_proj": (h, cfg["ffn"])}[module]


def write_tiny_lora(folder, seed: int = 0, r: int = 4, alpha: float = 8, strength: float = 0.5,
                    targets=ATTN + MLP, layers=None, config: dict | None = None, extra: dict | None = None) -> Path:
    """A random adapter at `folder`; `strength` scales the random B (PEFT starts it at 0);
    `config` entries replace adapter_config.json's, `extra` adds tensors (name -> tensor)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY["layers"]) if layers is None else layers:
        for module in targets:
            out, inp = module_shape(module)
            part = "self_attn" if module in ATTN else "mlp"
            key = f"{PREFIX}.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) / inp ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * strength / r ** 0.5
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": r,
           "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
           "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder
