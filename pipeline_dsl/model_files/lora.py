"""A LoRA adapter folder (PEFT's) as `agp check` reads it, without torch: its adapter_config.json
checked for what agp can apply (read_config) and its weights file found (check_folder); the
matrices are read by engine/lora.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT's module names -> (the submodule of a decoder layer, agp's weight name)
MODULES = {"q_proj": ("self_attn", "q"), "k_proj": ("self_attn", "k"), "v_proj": ("self_attn", "v"),
           "o_proj": ("self_attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}
# PEFT's LoRA settings that change what an adapter computes beyond y = W x + scale * B A x: each
# refused where set
VARIANTS = {"alora_invocation_tokens": "activated LoRA (applied after its invocation tokens only)",
            "layer_replication": "replicated layers", "lora_bias": "a bias on lora_B",
            "trainable_token_indices": "trained embedding rows", "target_parameters": "adapted parameters",
            "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
            "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA"}
# PEFT's initialisations that change the base weights too (W - B0 A0, the residual model, is what
# the adapter was trained on): an adapter saved as they leave it does not apply to the base model.
# PEFT converts one into a plain adapter of the base (path_initial_model_for_weight_conversion),
# whose config then says init_lora_weights true. EVA leaves the base alone: read as any other.
BASE_CHANGING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ"}
INIT_HINT = ("re-save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), which "
             "converts it into an adapter of the base model (its config then says init_lora_weights true)")

class LoraError(ValueError):
    """An adapter agp cannot apply: the message names the file and the key."""


def refuse(file: Path, key: str, why: str) -> LoraError:
    return LoraError(f"{file}: {key}: {why}")


def read_config(path: str | Path) -> tuple[int, float]:
    """(r, scale) of the adapter in PEFT folder `path` from its adapter_config.json (no torch);
    LoraError naming the file and key of what agp can't apply, or a missing folder or file."""
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoraError(f"{folder}: not a folder (a LoRA adapter is a PEFT folder holding {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE})")
    if not cfg_file.is_file():
        raise LoraError(f"{cfg_file}: missing (a LoRA adapter is a PEFT folder holding {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{cfg_file}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{cfg_file}: not a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise refuse(cfg_file, "peft_type", f"{peft_type!r}: agp applies LoRA adapters only")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise refuse(cfg_file, "r", f"must be a positive integer, not {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise refuse(cfg_file, "lora_alpha", f"must be a number, not {alpha!r}")
    if cfg.get("use_dora"):
        raise refuse(cfg_file, "use_dora", "DoRA adapters are not supported (merge it into the weights)")
    if cfg.get("modules_to_save"):
        raise refuse(cfg_file, "modules_to_save", f"{cfg['modules_to_save']!r}: agp applies only the low-rank "
                      "pairs of the attention and MLP linears, not whole modules saved beside them")
    if cfg.get("bias", "none") not in ("none", None):
        raise refuse(cfg_file, "bias", f"{cfg['bias']!r}: adapters with trained biases are not supported")
    if cfg.get("fan_in_fan_out"):
        raise refuse(cfg_file, "fan_in_fan_out", "true is not supported (a Conv1D model's layout)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise refuse(cfg_file, key, "per-module ranks or alphas are not supported")
    for key, what in VARIANTS.items():
        if cfg.get(key):
            raise refuse(cfg_file, key, f"{what} is not supported (agp applies plain LoRA pairs)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        family = next((what for prefix, what in BASE_CHANGING_INITS.items() if init.lower().startswith(prefix)), None)
        if family is not None:
            raise refuse(cfg_file, "init_lora_weights", f"{init!r}: {family} trains an adapter on base weights it "
                          f"changes, not on the model's: {INIT_HINT}")
    for key in ("loftq_config", "corda_config"):
        if cfg.get(key):
            family = BASE_CHANGING_INITS[key.split("_")[0]]
            raise refuse(cfg_file, key, f"{family} trains an adapter on base weights it changes, not on the "
                          f"model's: {INIT_HINT}")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        other = [t for t in targets if t not in MODULES]
        if other:
            raise refuse(cfg_file, "target_modules", f"{other[0]!r}: agp applies adapters to "
                          f"{', '.join(MODULES)} only")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scale)


def weights_file(folder: Path) -> Path:
    """The adapter's adapter_model.safetensors in `folder`; LoraError where it is missing."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        bin_file = folder / "adapter_model.bin"
        extra = f" ({bin_file.name} is a pickle agp does not read: save with safe_serialization)" \
            if bin_file.exists() else ""
        raise LoraError(f"{weights}: missing{extra}")
    return weights


def check_folder(path: str | Path) -> tuple[int, float]:
    """What `agp check` asks of an adapter folder without torch: (r, scale) of its adapter_config.json
    (read_config), and its weights file there (not read); LoraError as read_adapter's."""
    r, scale = read_config(path)
    weights_file(Path(path))
    return r, scale
