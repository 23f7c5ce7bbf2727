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
added to the base output of its rows; rows of no adapter cost nothing. The delta is computed in
float32 whatever the model's dtype (A and B are kept in float32; vLLM's kernels, too, keep the
[rows, r] product in float32) and the base output is rounded once, with it added: computed in
bf16, the product x A, the delta and the sum were each rounded to 8 bits of mantissa, which moved
a strong adapter's logits over a tiny model's 4-bit blocks 10.9 from the float32 model's with it
merged (1.6 in float32; the adapter merged into bf16 weights: 3.7; tests/test_lora.py). Measured
on CPU against a per-row gather of the matrices (bench/lora_cost.py), grouping was cheaper: the
gather copies each adapter's A and B once per row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline_dsl.model_files.lora import MODULES, WEIGHTS_FILE, LoraError, read_config, refuse, weights_file

if TYPE_CHECKING:           # torch is imported where matrices are made: agp check reads adapters without it
    import torch

# agp's fused linears and the modules each holds, in the order of its output rows
FUSED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


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


def read_adapter(path: str | Path, name: str | None = None, base_model_name: str | None = None) -> LoraAdapter:
    """The adapter in PEFT folder `path`; LoraError naming the file and key of what agp can't apply."""
    folder = Path(path)
    r, scale = read_config(folder)
    weights = weights_file(folder)
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
            raise refuse(weights, key, f"not a LoRA matrix agp can apply ({what})")
        layer, module, half = int(m.group(1)), MODULES[m.group(3)][1], m.group(4)
        if t.dim() != 2:
            raise refuse(weights, key, f"has shape {list(t.shape)}, not a matrix")
        want = 0 if half == "A" else 1
        if t.shape[want] != r:
            raise refuse(weights, key, f"has shape {list(t.shape)}: its rank {t.shape[want]} is not the "
                          f"config's r = {r}")
        halves[(layer, module, half)] = (key, t.float())
    if not halves:
        raise LoraError(f"{weights}: holds no LoRA matrices")
    pairs = {}
    for (layer, module, half), (key, t) in halves.items():
        other = "B" if half == "A" else "A"
        if (layer, module, other) not in halves:
            raise refuse(weights, key, f"has no lora_{other} beside it")
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
            raise refuse(file, key + ".lora_A.weight", f"layer {layer}: the model has {config.num_layers} layers")
        out, inp = want[module]
        if a.shape[1] != inp:
            raise refuse(file, key + ".lora_A.weight", f"has shape {list(a.shape)}: the model's {module} "
                          f"projection takes {inp} inputs")
        if b.shape[0] != out:
            raise refuse(file, key + ".lora_B.weight", f"has shape {list(b.shape)}: the model's {module} "
                          f"projection has {out} outputs")


class LoraWeights:
    """An adapter fitted to one model: per layer and fused linear, (A [R, in], B [out, R]) in
    float32 on the model's device (scale folded into B), or None where the adapter leaves it alone
    (whatever the model's `dtype`: the deltas are computed in float32, StepLora.add).
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
                fused[lin] = (a.to(device=device, dtype=torch.float32).contiguous(),
                              b.to(device=device, dtype=torch.float32).contiguous())
            self.layers.append(fused)


class StepLora:
    """The adapters of one step's rows: (weights, rows) per adapter, rows a slice where its
    sequences' rows are contiguous, else an index tensor. `per_row` (batch-invariant mode): each
    row's delta computed alone, so that it does not depend on which rows share the step."""

    def __init__(self, groups: list, per_row: bool = False):
        self.groups, self.per_row = groups, per_row

    def add(self, li: int, which: str, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [T, out] (linear `which` of layer li on x [T, in]) with each group's delta added in place:
        computed in float32, the sum rounded once to y's dtype."""
        for weights, rows in self.groups:
            pair = weights.layers[li][which]
            if pair is None:
                continue
            a, b = pair
            if self.per_row:
                for r in (range(rows.start, rows.stop) if isinstance(rows, slice) else rows.tolist()):
                    y[r:r + 1] = _plus_delta(y[r:r + 1], x[r:r + 1], a, b)
            elif isinstance(rows, slice):
                y[rows] = _plus_delta(y[rows], x[rows], a, b)
            else:
                y.index_copy_(0, rows, _plus_delta(y.index_select(0, rows), x.index_select(0, rows), a, b))
        return y

    def layer(self, li: int) -> "LayerLora":
        return LayerLora(self, li)


def _plus_delta(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y + (x A^T) B^T, computed in float32 (a, b are) and rounded once to y's dtype."""
    return (y.float() + (x.float() @ a.t()) @ b.t()).to(y.dtype)


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
