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
         k // g). The "gptq" checkpoint format (AutoGPTQ's, optimum's, GPTQModel's: v1) stores
         z - 1 (GPTQModel: each packed int32 less 0x11111111, a zero of 0 borrowing from the next
         field), "gptq_v2" z itself. sym: z is 2^(bits-1) (stored all the same).
    compressed-tensors (quant_method "compressed-tensors", format "pack-quantized": RedHatAI's,
         llm-compressor's w4a16 and w8a16): weight_packed int32 [N, K/p] packing consecutive inputs
         as GPTQ packs them, each code stored plus 2^(bits-1) (unsigned); weight_scale [N, G];
         weight_zero_point int32 [N/p, G] packed along the outputs (asymmetric schemes only: a
         symmetric one's zero is 0, i.e. 2^(bits-1) unsigned); weight_shape [N, K]; weight_g_idx
         [K] (actorder "group"). Strategy "group" (group_size) or "channel" (one group).

A module the file holds as a plain `.weight` is read as one (AWQ's modules_to_not_convert, a
GPTQ model's unquantized layers): the file decides, layer by layer. Settings whose layout agp
does not read (other bit widths, AWQ's gemv/marlin kernels' layouts, Marlin or other
checkpoint formats, GPTQModel's per-module `dynamic` overrides and rotations) are a
ModelFileProblem naming config.json and the key. The config is found and spelled as vLLM reads
it: quantization_config, else compression_config, else a gemma3 text_config's; quant_method
and formats in any case ("compressed_tensors" too).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .problem import ModelFileProblem

QUANT_METHODS = ("awq", "gptq", "compressed-tensors")
# the tensors of one quantized linear layer: AWQ's and GPTQ's (g_idx: GPTQ's, optional), and
# compressed-tensors' under the same roles (weight_zero_point: asymmetric only; weight_shape: [out, in])
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CT_SUFFIXES = {"weight_packed": "qweight", "weight_zero_point": "qzeros", "weight_scale": "scales",
               "weight_g_idx": "g_idx", "weight_shape": "shape"}
_FLOAT = ("F16", "BF16", "F32")
_INT = ("I32",)


@dataclass(frozen=True)
class QuantSpec:
    method: str          # "awq" | "gptq" | "compressed-tensors"
    bits: int            # 4 (AWQ); 4 or 8 (GPTQ)
    group_size: int      # inputs per group; -1: one group of every input
    zero_point: bool     # zeros vary (AWQ's zero_point, GPTQ's not sym): informational, the file's zeros are read
    desc_act: bool       # GPTQ: groups by g_idx (act order)
    zeros_minus_one: bool   # GPTQ's v1 checkpoint format: the stored zero is z - 1

    @property
    def name(self) -> str:
        return {"awq": "AWQ", "gptq": "GPTQ"}.get(self.method, self.method)

    @property
    def pack(self) -> int:
        """Codes per int32."""
        return 32 // self.bits

    def groups(self, k: int) -> int:
        """Groups of a layer of k inputs."""
        return 1 if self.group_size == -1 else math.ceil(k / self.group_size)

    def describe(self) -> str:
        group = "per column" if self.group_size == -1 else f"groups of {self.group_size}"
        return f"{self.name} {self.bits}-bit, {group}"


def _where(key: str) -> str:
    return f"quantization_config's '{key}'"


def hf_quant_spec(cfg: dict, path) -> QuantSpec | None:
    """The QuantSpec of a config.json's quantization_config (None: no quantization_config).
    `cfg`: config.json as read; `path`: config.json, for the message."""
    label, q = _quant_config(cfg)
    if q is None:
        return None

    def fail(problem):        # named by the key the config came from
        raise ModelFileProblem(path, problem.replace("quantization_config", label, 1))

    if not isinstance(q, dict):
        fail(f"'quantization_config' must be an object, not {json.dumps(q)[:80]}")
    method = q.get("quant_method")
    if isinstance(method, str):               # as vLLM reads it: "GPTQ", "compressed_tensors"
        method = method.lower().replace("compressed_tensors", "compressed-tensors")
    if method not in QUANT_METHODS:
        fail(f"quantization_config's 'quant_method' {json.dumps(method)[:40]} is not supported: agp loads AWQ "
             f"(\"awq\"), GPTQ (\"gptq\") and compressed-tensors' pack-quantized (\"compressed-tensors\") "
             f"checkpoints, a GGUF file's Q4/Q8 types, or the unquantized model with --dtype int8")
    if method == "compressed-tensors":
        return _compressed_tensors_spec(q, fail)

    def get(key, *aliases, default=None):
        for k in (key, *aliases):
            if k in q:
                return k, q[k]
        return key, default

    def boolean(key, default):
        k, v = get(key, default=default)
        if not isinstance(v, bool):
            fail(f"{_where(k)} must be true or false, not {json.dumps(v)[:80]}")
        return v

    key, bits = get("bits", "w_bit")
    if bits is None:
        fail(f"{_where('bits')} is missing")
    _integer(bits, _where(key), fail)
    allowed = (4,) if method == "awq" else (4, 8)
    if bits not in allowed:
        fail(f"{_where(key)} is {json.dumps(bits)[:40]}: agp loads {method.upper()} checkpoints of "
             f"{' or '.join(map(str, allowed))} bits")
    key, group = get("group_size", "q_group_size", default=128 if method == "awq" else -1)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or 1 <= group <= 1 << 20):
        fail(f"{_where(key)} must be a positive integer or -1 (one group per column), not {json.dumps(group)[:40]}")
    rotation = q.get("rotation")
    if rotation:
        fail(f"{_where('rotation')} is {json.dumps(rotation)[:40]}: agp reads weights without a rotation "
             f"applied to them")
    if method == "awq":
        # the layout: version (AutoAWQ's), format (transformers' AwqConfig, GPTQModel's); backend names
        # the kernel that runs it, except llm-awq's, which orders its codes otherwise
        for key in ("version", "format", "checkpoint_format", "backend"):
            value = q.get(key)
            if isinstance(value, str) and value.lower() == "llm-awq":
                fail(f"{_where(key)} is {json.dumps(value)[:40]}: agp reads AutoAWQ's packing; llm-awq's "
                     f"orders its codes otherwise")
            if key != "backend" and value is not None and (not isinstance(value, str) or value.lower() != "gemm"):
                fail(f"{_where(key)} is {json.dumps(value)[:40]}: agp reads the layout of AWQ's \"gemm\" "
                     f"checkpoints (the common one); \"gemv\", \"gemv_fast\" and \"marlin\" pack their weights "
                     f"otherwise")
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
    if isinstance(fmt, str):
        fmt = fmt.lower()
    if fmt not in ("gptq", "gptq_v2"):
        fail(f"{_where(key)} is {json.dumps(fmt)[:40]}: agp reads GPTQ's \"gptq\" (zeros stored minus one, "
             f"AutoGPTQ's and optimum's) and \"gptq_v2\" checkpoints, not Marlin's or other kernels' layouts")
    if q.get("is_marlin_format", False) is not False:
        fail(f"{_where('is_marlin_format')} is {json.dumps(q['is_marlin_format'])}: agp reads GPTQ's own layout, "
             f"not Marlin's")
    dynamic = q.get("dynamic")
    # GPTQModel's per-module overrides; a "-:" key skips its modules, which the file holds as plain weights
    if dynamic and not (isinstance(dynamic, dict) and all(isinstance(k, str) and k.startswith("-:") for k in dynamic)):
        fail(f"{_where('dynamic')} sets bits or groups per module: agp loads GPTQ checkpoints with one setting "
             f"for every layer (a \"-:\" entry, which leaves modules unquantized, alone is read)")
    key, pack_dtype = get("pack_dtype", default="int32")
    if pack_dtype not in ("int32", "torch.int32"):
        fail(f"{_where(key)} is {json.dumps(pack_dtype)[:40]}: agp reads codes packed in int32")
    return QuantSpec("gptq", bits, group, not sym, desc_act, fmt == "gptq")


def _compressed_tensors_spec(q: dict, fail) -> QuantSpec:
    """compressed-tensors' weight-only integer schemes in its pack-quantized format."""
    fmt = _ct_format(q.get("format"))
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        fail(f"{_where('config_groups')} must be an object of quantization schemes, not "
             f"{json.dumps(groups)[:80]}")
    weights = []
    for name, group in groups.items():
        where = f"quantization_config's config_groups.{name}"
        fmt_here = _ct_format(group.get("format", fmt))
        if fmt_here != "pack-quantized":
            fail(f"{where}'s 'format' is {json.dumps(fmt_here)[:40]}: agp reads compressed-tensors' "
                 f"\"pack-quantized\" weights (integer codes packed in int32) alone")
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                fail(f"{where}'s '{key}' is set: agp runs weight-only schemes (w4a16, w8a16), its "
                     f"activations unquantized")
        w = group.get("weights")
        if not isinstance(w, dict):
            fail(f"{where}'s 'weights' must be an object, not {json.dumps(w)[:80]}")
        weights.append((where, w))
    where, w = weights[0]
    if any(other != w for _, other in weights[1:]):
        fail("quantization_config's config_groups quantize their weights differently: agp loads one "
             "setting for every layer")
    if w.get("type", "int") != "int":
        fail(f"{where}.weights' 'type' is {json.dumps(w.get('type'))[:40]}: agp reads integer codes (\"int\")")
    bits = w.get("num_bits")
    _integer(bits, f"{where}.weights' 'num_bits'", fail)
    if bits not in (4, 8):
        fail(f"{where}.weights' 'num_bits' is {json.dumps(bits)[:40]}: agp loads 4 or 8 bits")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        fail(f"{where}.weights' 'strategy' is {json.dumps(strategy)[:40]}: agp reads scales per group "
             f"(\"group\") or per output channel (\"channel\")")
    group = w.get("group_size") if strategy == "group" else -1
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or 1 <= group <= 1 << 20):
        fail(f"{where}.weights' 'group_size' must be a positive integer, not {json.dumps(group)[:40]}")
    if w.get("dynamic", False) is not False:
        fail(f"{where}.weights' 'dynamic' is {json.dumps(w['dynamic'])[:40]}: agp reads scales stored in the file")
    sym = w.get("symmetric", True)
    if not isinstance(sym, bool):
        fail(f"{where}.weights' 'symmetric' must be true or false, not {json.dumps(sym)[:40]}")
    actorder = w.get("actorder")
    # as compressed-tensors reads it: true is "group", false none, "dynamic" "group"'s other name
    actorder = {True: "group", False: None}.get(actorder, actorder) if isinstance(actorder, bool) \
        else actorder.lower() if isinstance(actorder, str) else actorder
    if actorder not in (None, "static", "group", "weight", "dynamic"):
        fail(f"{where}.weights' 'actorder' is {json.dumps(w.get('actorder'))[:40]}: agp reads null, false, true, "
             f"\"static\", \"weight\", \"group\" and \"dynamic\"")
    if q.get("transform_config"):             # compressed-tensors writes {} where there is none
        fail("quantization_config's 'transform_config' is set: agp reads weights without rotations or other "
             "transforms applied to them")
    if q.get("kv_cache_scheme"):
        fail("quantization_config's 'kv_cache_scheme' is set: agp's KV cache has the engine's compute dtype")
    sparsity = q.get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense":
        fail(f"quantization_config's 'sparsity_config' is {json.dumps(sparsity)[:80]}: agp reads dense weights")
    return QuantSpec("compressed-tensors", bits, group, not sym, actorder in ("group", "dynamic"), False)


def _ct_format(fmt):
    """A compressed-tensors format as vLLM compares it ("Pack_Quantized" is "pack-quantized")."""
    return fmt.lower().replace("_", "-") if isinstance(fmt, str) else fmt


def _integer(bits, where: str, fail) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        fail(f"{where} must be an integer number of bits, not {json.dumps(bits)[:40]}")


def _quant_config(cfg: dict):
    """(the key it was read from, the quantization config) of a config.json, as vLLM finds it:
    quantization_config, else compression_config (compressed-tensors' older name), else those of a
    multimodal folder's text_config (where agp reads the text model from it); (None, None) if none."""
    places = [(cfg, "")]
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        places.append((cfg["text_config"], "text_config."))
    for where, prefix in places:
        for key in ("quantization_config", "compression_config"):
            if where.get(key) is not None:
                return prefix + key, where[key]
    return None, None


def quant_parts(name: str):
    """'model.layers.0.mlp.up_proj.qweight' -> ('model.layers.0.mlp.up_proj', 'qweight'), and a
    compressed-tensors name under the same role ('...up_proj.weight_packed' -> 'qweight'); None if the
    name is not a quantized layer's tensor."""
    prefix, _, suffix = name.rpartition(".")
    if not prefix:
        return None
    if suffix in QUANT_SUFFIXES:
        return prefix, suffix
    return (prefix, CT_SUFFIXES[suffix]) if suffix in CT_SUFFIXES else None


def file_suffix(spec: QuantSpec | None, role: str) -> str:
    """How a file spells a quantized tensor's role ('qweight' -> compressed-tensors' 'weight_packed')."""
    if spec is not None and spec.method == "compressed-tensors":
        return next(k for k, v in CT_SUFFIXES.items() if v == role)
    return role


def check_quantized(spec: QuantSpec | None, config_path, module: str, parts: dict) -> tuple[int, int]:
    """The dense shape (out, in) of one quantized linear layer, after checking its tensors
    (`parts`: role (quant_parts') -> (dtype, shape, file, the file's name)) against the spec.
    Raises ModelFileProblem."""
    first = next(iter(parts.values()))
    if spec is None:
        raise ModelFileProblem(first[2], f"tensor {first[3]!r} is a quantized layer's, but "
                                         f"{Path(config_path).name} has no 'quantization_config' saying how to read it")
    ct = spec.method == "compressed-tensors"

    def spell(role):
        return f"{module}.{file_suffix(spec, role)}"

    if not ct and any(name.rpartition(".")[2] in CT_SUFFIXES for *_, name in parts.values()) \
            or ct and any(name.rpartition(".")[2] in QUANT_SUFFIXES for *_, name in parts.values()):
        other = next(name for *_, name in parts.values())
        raise ModelFileProblem(first[2], f"tensor {other!r} is not how a {spec.name} checkpoint names a layer's "
                                         f"tensors (config.json's quantization_config says {spec.name})")
    need = ("qweight", "scales") + (("shape",) if ct else ()) + (("qzeros",) if not ct or spec.zero_point else ())
    for role in need:
        if role not in parts:
            raise ModelFileProblem(first[2], f"missing tensor {spell(role)!r} of a {spec.name} layer "
                                             f"({first[3]!r} is there)")
    if "g_idx" in parts and spec.method == "awq":
        raise ModelFileProblem(parts["g_idx"][2], f"tensor '{module}.g_idx' is a GPTQ layer's, but config.json's "
                                                  f"quantization_config says AWQ")
    if ct and not spec.zero_point:
        parts = {r: v for r, v in parts.items() if r != "qzeros"}   # a symmetric scheme's zero is 0
    for role, (dtype, shape, f, name) in parts.items():
        want = _FLOAT if role == "scales" else ("I64", "I32") if role == "shape" else _INT
        if dtype not in want:
            raise ModelFileProblem(f, f"tensor {name!r} is {dtype}, but a {spec.name} layer's "
                                      f"{name.rpartition('.')[2]} is {' or '.join(want)}")
        if len(shape) != (1 if role in ("g_idx", "shape") else 2):
            raise ModelFileProblem(f, f"tensor {name!r} has shape {list(shape)}: not a {spec.name} layer's")
    qw, p = parts["qweight"][1], spec.pack
    k, n = (qw[0], qw[1] * p) if spec.method == "awq" else (qw[0] * p, qw[1]) if spec.method == "gptq" \
        else (qw[1] * p, qw[0])
    g = spec.groups(k)
    want = {"qzeros": [g, n // p] if not ct else [n // p, g], "scales": [g, n] if not ct else [n, g],
            "g_idx": [k], "shape": [2]}
    if n % p:
        raise ModelFileProblem(parts["qweight"][2], f"tensor {spell('qweight')!r} has shape {list(qw)}: its {n} "
                                                    f"outputs do not pack {p} to an int32")
    if spec.method == "awq" and spec.group_size != -1 and k % spec.group_size:
        raise ModelFileProblem(parts["qweight"][2], f"tensor {spell('qweight')!r} has {k} inputs, not a multiple of "
                                                    f"{_where('group_size')} {spec.group_size}")
    for role, shape in want.items():
        if role in parts and list(parts[role][1]) != shape:
            raise ModelFileProblem(parts[role][2],
                                   f"tensor {parts[role][3]!r} has shape {list(parts[role][1])}, but a "
                                   f"{spec.describe()} layer of {k} inputs and {n} outputs ({spell('qweight')!r} "
                                   f"{list(qw)}) has {shape}")
    return n, k
