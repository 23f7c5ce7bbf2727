"""LoRA adapters (PEFT's folders), applied per sequence beside the base weights, unmerged.

    adapter = read_adapter("/adapters/sql", name="sql")     # LoraError: what the folder holds that agp can't apply
    engine.add_lora(adapter)                                 # checks it fits the model, then serves it
    engine.add_request("r1", prompt=..., params=SamplingParams(lora="sql"))

A PEFT adapter folder holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora)
and `adapter_model.safetensors` with a pair of matrices per targeted linear of each layer:
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]. A layer's linear then computes y = W x + scale * B (A x), scale = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora). agp applies the q/k/v/o projections and the MLP's
gate/up/down; anything else an adapter changes (the embeddings, the lm_head, modules_to_save,
DoRA's magnitudes, biases) is refused by name rather than left out.

The model fuses Q, K and V into one linear (and gate with up): per layer and per fused
linear, an adapter keeps A as the targeted modules' A stacked [sum r, in] and B as a
block-diagonal [out, sum r] with its scale folded in, so its delta is two small GEMMs. A step
groups its rows by adapter (the rows of one sequence are contiguous): each group's delta is
added to the base output of its rows; rows of no adapter cost nothing. Measured on CPU against
a per-row gather of the matrices (bench/lora_cost.py), grouping was cheaper: the gather copies
each adapter's A and B once per row.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:           # torch is imported where matrices are made: agp check reads adapters without it
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT's module names -> (the submodule of a decoder layer, agp's weight name)
MODULES = {"q_proj": ("self_attn", "q"), "k_proj": ("self_attn", "k"), "v_proj": ("self_attn", "v"),
           "o_proj": ("self_attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}
# agp's fused linears and the modules each holds, in the order of its output rows
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
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
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class LoraError(ValueError):
    """An adapter agp cannot apply: the message names the file and the key."""


@dataclass
class LoraAdapter:
    """A PEFT adapter as read from its folder (float32 on the CPU, not yet fitted to a model)."""
    name: str
    path: str
    rank: int
    scale: float
    base_model_name: str | None = None
    pairs: dict = field(default_factory=dict)   # (layer, "q"|...|"down") -> (A [r, in], B [out, r])

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.pairs})


def _refuse(file: Path, key: str, why: str) -> LoraError:
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
        raise _refuse(cfg_file, "peft_type", f"{peft_type!r}: agp applies LoRA adapters only")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _refuse(cfg_file, "r", f"must be a positive integer, not {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _refuse(cfg_file, "lora_alpha", f"must be a number, not {alpha!r}")
    if cfg.get("use_dora"):
        raise _refuse(cfg_file, "use_dora", "DoRA adapters are not supported (merge it into the weights)")
    if cfg.get("modules_to_save"):
        raise _refuse(cfg_file, "modules_to_save", f"{cfg['modules_to_save']!r}: agp applies only the low-rank "
                      "pairs of the attention and MLP linears, not whole modules saved beside them")
    if cfg.get("bias", "none") not in ("none", None):
        raise _refuse(cfg_file, "bias", f"{cfg['bias']!r}: adapters with trained biases are not supported")
    if cfg.get("fan_in_fan_out"):
        raise _refuse(cfg_file, "fan_in_fan_out", "true is not supported (a Conv1D model's layout)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise _refuse(cfg_file, key, "per-module ranks or alphas are not supported")
    for key, what in VARIANTS.items():
        if cfg.get(key):
            raise _refuse(cfg_file, key, f"{what} is not supported (agp applies plain LoRA pairs)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str):
        family = next((what for prefix, what in BASE_CHANGING_INITS.items() if init.lower().startswith(prefix)), None)
        if family is not None:
            raise _refuse(cfg_file, "init_lora_weights", f"{init!r}: {family} trains an adapter on base weights it "
                          f"changes, not on the model's: {INIT_HINT}")
    for key in ("loftq_config", "corda_config"):
        if cfg.get(key):
            family = BASE_CHANGING_INITS[key.split("_")[0]]
            raise _refuse(cfg_file, key, f"{family} trains an adapter on base weights it changes, not on the "
                          f"model's: {INIT_HINT}")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        other = [t for t in targets if t not in MODULES]
        if other:
            raise _refuse(cfg_file, "target_modules", f"{other[0]!r}: agp applies adapters to "
                          f"{', '.join(MODULES)} only")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scale)


def _weights_file(folder: Path) -> Path:
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
    _weights_file(Path(path))
    return r, scale


def read_adapter(path: str | Path, name: str | None = None, base_model_name: str | None = None) -> LoraAdapter:
    """The adapter in PEFT folder `path`; LoraError naming the file and key of what agp can't apply."""
    folder = Path(path)
    r, scale = read_config(folder)
    weights = _weights_file(folder)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # pragma: no cover - a dependency
        raise LoraError("reading LoRA adapters needs the safetensors package") from None
    tensors: dict = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in sorted(f.keys()):
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{weights}: not a safetensors file ({e})") from None
    halves: dict = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in MODULES or MODULES[m.group(3)][0] != m.group(2):
            what = "agp applies adapters to " + ", ".join(MODULES)
            if "lora_magnitude" in key:
                what = "DoRA adapters are not supported"
            raise _refuse(weights, key, f"not a LoRA matrix agp can apply ({what})")
        layer, module, half = int(m.group(1)), MODULES[m.group(3)][1], m.group(4)
        if t.dim() != 2:
            raise _refuse(weights, key, f"has shape {list(t.shape)}, not a matrix")
        want = 0 if half == "A" else 1
        if t.shape[want] != r:
            raise _refuse(weights, key, f"has shape {list(t.shape)}: its rank {t.shape[want]} is not the "
                          f"config's r = {r}")
        halves[(layer, module, half)] = (key, t.float())
    if not halves:
        raise LoraError(f"{weights}: holds no LoRA matrices")
    pairs = {}
    for (layer, module, half), (key, t) in halves.items():
        other = "B" if half == "A" else "A"
        if (layer, module, other) not in halves:
            raise _refuse(weights, key, f"has no lora_{other} beside it")
        if half == "A":
            pairs[(layer, module)] = (t, halves[(layer, module, "B")][1])
    return LoraAdapter(name or folder.name, str(folder), r, scale, base_model_name, pairs)


def _key(layer: int, module: str) -> str:
    part, peft = next((p, k) for k, (p, m) in MODULES.items() if m == module)
    return f"base_model.model.model.layers.{layer}.{part}.{peft}"


def shapes(config) -> dict:
    """(out, in) of each linear agp's adapters may target, for a LlamaConfig."""
    c = config
    return {"q": (c.num_heads * c.head_dim, c.hidden_size), "k": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "v": (c.num_kv_heads * c.head_dim, c.hidden_size), "o": (c.hidden_size, c.num_heads * c.head_dim),
            "gate": (c.intermediate_size, c.hidden_size), "up": (c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size)}


def check_fits(adapter: LoraAdapter, config) -> None:
    """LoraError naming the file and key of a matrix whose shape the model's linear can't take."""
    file = Path(adapter.path) / WEIGHTS_FILE
    family = "Gemma 3" if getattr(config, "gemma", False) else "Phi-3" if getattr(config, "fused", False) else None
    if family is not None:   # their layers differ from the ones the deltas are added to (gemma.py, phi3.py)
        raise LoraError(f"{Path(adapter.path)}: LoRA adapters apply to llama, mistral, qwen2 and qwen3 models; "
                        f"not to {family}'s layers")
    want = shapes(config)
    for (layer, module), (a, b) in sorted(adapter.pairs.items()):
        key = _key(layer, module)
        if layer >= config.num_layers:
            raise _refuse(file, key + ".lora_A.weight", f"layer {layer}: the model has {config.num_layers} layers")
        out, inp = want[module]
        if a.shape[1] != inp:
            raise _refuse(file, key + ".lora_A.weight", f"has shape {list(a.shape)}: the model's {module} "
                          f"projection takes {inp} inputs")
        if b.shape[0] != out:
            raise _refuse(file, key + ".lora_B.weight", f"has shape {list(b.shape)}: the model's {module} "
                          f"projection has {out} outputs")


class LoraWeights:
    """An adapter fitted to one model: per layer and fused linear, (A [R, in], B [out, R]) in the
    model's dtype and device (scale folded into B), or None where the adapter leaves it alone.
    Of the adapter read from its folder it keeps its name, path and rank only: its float32 host
    matrices go once fitted."""

    def __init__(self, adapter: LoraAdapter, config, dtype, device):
        import torch

        check_fits(adapter, config)
        self.name, self.path, self.rank = adapter.name, adapter.path, adapter.rank
        want = shapes(config)
        self.layers: list[dict] = []
        for li in range(config.num_layers):
            fused = {}
            for lin, modules in FUSED.items():
                got = [m for m in modules if (li, m) in adapter.pairs]
                if not got:
                    fused[lin] = None
                    continue
                a = torch.cat([adapter.pairs[(li, m)][0] for m in got], dim=0)          # [R, in]
                b = torch.zeros(sum(want[m][0] for m in modules), a.shape[0])          # [out, R]
                row = col = 0
                for m in modules:
                    if (li, m) in adapter.pairs:
                        bm = adapter.pairs[(li, m)][1]                                  # [out_m, r]
                        b[row:row + bm.shape[0], col:col + bm.shape[1]] = bm * adapter.scale
                        col += bm.shape[1]
                    row += want[m][0]
                fused[lin] = (a.to(device=device, dtype=dtype).contiguous(),
                              b.to(device=device, dtype=dtype).contiguous())
            self.layers.append(fused)


class StepLora:
    """The adapters of one step's rows: (weights, rows) per adapter, rows a slice where its
    sequences' rows are contiguous, else an index tensor. `per_row` (batch-invariant mode): each
    row's delta computed alone, so that it does not depend on which rows share the step."""

    def __init__(self, groups: list, per_row: bool = False):
        self.groups, self.per_row = groups, per_row

    def add(self, li: int, which: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [T, out] (linear `which` of layer li on x [T, in]) with each group's delta added in place."""
        for weights, rows in self.groups:
            pair = weights.layers[li][which]
            if pair is None:
                continue
            a, b = pair
            if self.per_row:
                for r in (range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()):
                    y[r:r + 1] += (x[r:r + 1] @ a.t()) @ b.t()
            elif isinstance(rows, slice):
                y[rows] += (x[rows] @ a.t()) @ b.t()
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return y

    def layer(self, li: int) -> "LayerLora":
        return LayerLora(self, li)


class LayerLora:
    __slots__ = ("step", "li")

    def __init__(self, step: StepLora, li: int):
        self.step, self.li = step, li

    def add(self, which: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.step.add(self.li, which, y, x)


def step_lora(loras: dict, names, offs, counts, device, per_row: bool = False) -> StepLora | None:
    """The StepLora of a step whose items (first row offs[i], counts[i] rows) name adapters
    `names` (None: the base model), from the runner's fitted adapters `loras` (name -> LoraWeights);
    per_row: each row's delta alone (batch-invariant mode)."""
    import torch

    rows: dict = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if name not in loras:
            raise ValueError(f"no LoRA adapter {name!r} is loaded in this runner")
        rows.setdefault(name, []).append((int(offs[i]), int(counts[i])))
    if not rows:
        return None
    groups = []
    for name, spans in rows.items():
        spans.sort()
        if all(spans[j][0] + spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1)):
            groups.append((loras[name], slice(spans[0][0], spans[-1][0] + spans[-1][1])))
        else:
            idx = torch.cat([torch.arange(s, s + n) for s, n in spans]).to(device)
            groups.append((loras[name], idx))
    return StepLora(groups, per_row)
