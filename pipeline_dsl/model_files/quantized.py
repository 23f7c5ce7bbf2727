"""A Hugging Face folder of 4-bit (or 8-bit) weights: config.json's `quantization_config`
checked, and the quantized tensors of each linear layer checked against it (names, dtypes,
shapes), without reading a weight. The engine (engine/hf_quant.py) reads the same layouts.

    AWQ  (quant_method "awq", version "gemm", 4 bits): per linear layer of K inputs and N outputs
         qweight int32 [K, N/8]  8 codes of one input row, output columns 8c + (0 2 4 6 1 3 5 7)
                                  in nibbles 0..7 (AutoAWQ's order)
         qzeros  int32 [K/g, N/8] the zero points, packed as qweight
         scales  float [K/g, N]   w[n, k] = (q - z) * s of k's group k // g (g -1: one group)
    GPTQ (quant_method "gptq", 4 or 8 bits): qweight int32 [K/p, N], p = 32/bits codes of
         consecutive inputs per int32, lowest bits first; qzeros int32 [G, N/p] packed along the
         outputs in the same order; scales [G, N]; g_idx int32 [K] (input k's group; without it
         k // g). The "gptq" checkpoint format (AutoGPTQ's, optimum's: v1) stores z - 1,
         "gptq_v2" z itself. sym: z is 2^(bits-1) (stored all the same).

A module the file holds as a plain `.weight` is read as one (AWQ's modules_to_not_convert, a
GPTQ model's unquantized layers): the file decides, layer by layer. Settings whose layout agp
does not read (other bit widths, AWQ's gemv/marlin kernels' layouts, Marlin or other
checkpoint formats, GPTQModel's per-module `dynamic` overrides) are a ModelFileProblem naming
config.json and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .problem import ModelFileProblem

QUANT_METHODS = ("awq", "gptq")
# the tensors of one quantized linear layer, by method (g_idx: optional)
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_FLOAT = ("F16", "BF16", "F32")
_INT = ("I32",)


@dataclass(frozen=True)
class QuantSpec:
    method: str          # "awq" | "gptq"
    bits: int            # 4 (AWQ); 4 or 8 (GPTQ)
    group_size: int      # inputs per group; -1: one group of every input
    zero_point: bool     # zeros vary (AWQ's zero_point, GPTQ's not sym): informational, the file's zeros are read
    desc_act: bool       # GPTQ: groups by g_idx (act order)
    zeros_minus_one: bool   # GPTQ's v1 checkpoint format: the stored zero is z - 1

    @property
    def pack(self) -> int:
        """Codes per int32."""
        return 32 // self.bits

    def groups(self, k: int) -> int:
        """Groups of a layer of k inputs."""
        return 1 if self.group_size == -1 else math.ceil(k / self.group_size)

    def describe(self) -> str:
        group = "per column" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"{self.method.upper()} {self.bits}-bit, {group}"


def _where(key: str) -> str:
    return f"quantization_config's '{key}'"


def hf_quant_spec(cfg: dict, path) -> QuantSpec | None:
    """The QuantSpec of a config.json's quantization_config (None: no quantization_config).
    `cfg`: config.json as read; `path`: config.json, for the message."""
    q = cfg.get("quantization_config")
    if q is None:
        return None

    def fail(problem):
        raise ModelFileProblem(path, problem)

    if not isinstance(q, dict):
        fail(f"'quantization_config' must be an object, not {json.dumps(q)[:80]}")
    method = q.get("quant_method")
    if method == "compressed-tensors":
        fail("quantization_config's 'quant_method' \"compressed-tensors\" is not supported: agp loads AWQ "
             "(\"awq\", version \"gemm\") and GPTQ (\"gptq\") checkpoints, a GGUF file's Q4/Q8 types, or "
             "the unquantized model with --dtype int8")
    if method not in QUANT_METHODS:
        fail(f"quantization_config's 'quant_method' {json.dumps(method)} is not supported: agp loads AWQ (\"awq\") "
             f"and GPTQ (\"gptq\") checkpoints")

    def get(key, *aliases, default=None):
        for k in (key, *aliases):
            if k in q:
                return k, q[k]
        return key, default

    def boolean(key, default, *aliases):
        k, v = get(key, *aliases, default=default)
        if not isinstance(v, bool):
            fail(f"{_where(k)} must be true or false, not {json.dumps(v)[:80]}")
        return v

    key, bits = get("bits", "w_bit")
    if bits is None:
        fail(f"{_where('bits')} is missing")
    allowed = (4,) if method == "awq" else (4, 8)
    if isinstance(bits, bool) or bits not in allowed:
        fail(f"{_where(key)} is {json.dumps(bits)[:40]}: agp loads {method.upper()} checkpoints of "
             f"{' or '.join(map(str, allowed))} bits")
    key, group = get("group_size", "q_group_size", default=128 if method == "awq" else -1)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or 1 <= group <= 1 << 20):
        fail(f"{_where(key)} must be a positive integer or -1 (one group per column), not {json.dumps(group)[:40]}")
    if method == "awq":
        key, version = get("version", default="gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            fail(f"{_where(key)} is {json.dumps(version)[:40]}: agp reads the layout of AWQ's \"gemm\" "
                 f"checkpoints (the common one); \"gemv\", \"gemv_fast\" and \"marlin\" pack their weights otherwise")
        zero_point = boolean("zero_point", True)
        not_convert = q.get("modules_to_not_convert")
        if not_convert is not None and not (isinstance(not_convert, list)
                                            and all(isinstance(m, str) for m in not_convert)):
            fail(f"{_where('modules_to_not_convert')} must be a list of module names or null, "
                 f"not {json.dumps(not_convert)[:80]}")
        return QuantSpec("awq", bits, group, zero_point, False, False)
    sym = boolean("sym", True)
    desc_act = boolean("desc_act", False)
    key, fmt = get("checkpoint_format", "format", default="gptq")
    if fmt not in ("gptq", "gptq_v2"):
        fail(f"{_where(key)} is {json.dumps(fmt)[:40]}: agp reads GPTQ's \"gptq\" (zeros stored minus one, "
             f"AutoGPTQ's and optimum's) and \"gptq_v2\" checkpoints, not Marlin's or other kernels' layouts")
    if q.get("is_marlin_format", False) is not False:
        fail(f"{_where('is_marlin_format')} is {json.dumps(q['is_marlin_format'])}: agp reads GPTQ's own layout, "
             f"not Marlin's")
    if q.get("dynamic"):
        fail(f"{_where('dynamic')} sets bits or groups per module: agp loads GPTQ checkpoints with one setting "
             f"for every layer")
    key, pack_dtype = get("pack_dtype", default="int32")
    if pack_dtype not in ("int32", "torch.int32"):
        fail(f"{_where(key)} is {json.dumps(pack_dtype)[:40]}: agp reads codes packed in int32")
    return QuantSpec("gptq", bits, group, not sym, desc_act, fmt == "gptq")


def quant_parts(name: str):
    """'model.layers.0.mlp.up_proj.qweight' -> ('model.layers.0.mlp.up_proj', 'qweight'); None if
    the name is not a quantized layer's tensor."""
    prefix, _, suffix = name.rpartition(".")
    return (prefix, suffix) if suffix in QUANT_SUFFIXES and prefix else None


def check_quantized(spec: QuantSpec | None, config_path, module: str, parts: dict) -> tuple[int, int]:
    """The dense shape (out, in) of one quantized linear layer, after checking its tensors
    (`parts`: suffix -> (dtype, shape, file)) against the spec. Raises ModelFileProblem."""
    first = next(iter(parts.values()))[2]
    if spec is None:
        name = f"{module}.{next(iter(parts))}"
        raise ModelFileProblem(first, f"tensor {name!r} is a quantized layer's, but {Path(config_path).name} has no "
                                      f"'quantization_config' saying how to read it")
    for need in ("qweight", "qzeros", "scales"):
        if need not in parts:
            raise ModelFileProblem(first, f"missing tensor '{module}.{need}' of a {spec.method.upper()} layer "
                                          f"('{module}.qweight' is there)" if "qweight" in parts else
                                   f"missing tensor '{module}.{need}': '{module}.{next(iter(parts))}' is a "
                                   f"{spec.method.upper()} layer's")
    if "g_idx" in parts and spec.method == "awq":
        raise ModelFileProblem(parts["g_idx"][2], f"tensor '{module}.g_idx' is a GPTQ layer's, but config.json's "
                                                  f"quantization_config says AWQ")
    for suffix, (dtype, shape, f) in parts.items():
        want = _FLOAT if suffix == "scales" else _INT
        if dtype not in want:
            raise ModelFileProblem(f, f"tensor '{module}.{suffix}' is {dtype}, but a {spec.method.upper()} layer's "
                                      f"{suffix} is {' or '.join(want)}")
        if len(shape) != (1 if suffix == "g_idx" else 2):
            raise ModelFileProblem(f, f"tensor '{module}.{suffix}' has shape {list(shape)}: not a "
                                      f"{spec.method.upper()} layer's")
    qw = parts["qweight"][1]
    p = spec.pack
    k, n = (qw[0], qw[1] * p) if spec.method == "awq" else (qw[0] * p, qw[1])
    g = spec.groups(k)
    want = {"qzeros": [g, n // p], "scales": [g, n], "g_idx": [k]}
    if n % p:
        raise ModelFileProblem(parts["qweight"][2], f"tensor '{module}.qweight' has shape {list(qw)}: its {n} "
                                                    f"outputs do not pack {p} to an int32")
    if spec.method == "awq" and spec.group_size != -1 and k % spec.group_size:
        raise ModelFileProblem(parts["qweight"][2], f"tensor '{module}.qweight' has {k} inputs, not a multiple of "
                                                    f"{_where('group_size')} {spec.group_size}")
    for suffix, shape in want.items():
        if suffix in parts and list(parts[suffix][1]) != shape:
            raise ModelFileProblem(parts[suffix][2],
                                   f"tensor '{module}.{suffix}' has shape {list(parts[suffix][1])}, but a "
                                   f"{spec.describe()} layer of {k} inputs and {n} outputs ('{module}.qweight' "
                                   f"{list(qw)}) has {shape}")
    return n, k
