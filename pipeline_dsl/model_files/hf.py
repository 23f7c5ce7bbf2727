"""A Hugging Face folder checked without reading weights: config.json (a llama-family
config with plausible values), the JSON header of every *.safetensors file (dtypes,
shapes and data offsets within the file), and the shapes against the config."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from . import phi3
from .gemma import GEMMA_MODEL_TYPES, hf_gemma_fields, hf_text_config
from .llama import (HF_NAMES, check_config, check_extra, check_weights, expected_shapes, hf_engine_name,
                    hf_file_name)
from .problem import ModelFileProblem
from .quantized import QuantSpec, check_quantized, hf_quant_spec, quant_parts
from .rope import hf_rope, rope_spec, scaled_context

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm", "smollm2", *GEMMA_MODEL_TYPES)
# the max_position_embeddings of a config.json that leaves it out, as each model type's transformers
# config class fills it in (LlamaConfig's 2048 for the others; Gemma 3's: model_files/gemma.py), and
# MistralConfig's sliding_window
_MAX_POSITION = {"mistral": 131072, "qwen2": 32768, "qwen3": 32768,
                 "phi3": phi3.HF_DEFAULTS["max_position_embeddings"]}
_MISTRAL_WINDOW = 4096
# the model types whose transformers attention takes config.attention_bias: a bias on q, k, v and o_proj
_ATTENTION_BIAS_TYPES = ("llama", "smollm", "smollm2", "qwen3")
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_ST_MAX_HEADER = 100 << 20     # safetensors' own limit on the JSON header


def read_json_object(path, what: str) -> dict:
    """A JSON file that must hold an object; `what` names it in the message if it is missing."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelFileProblem(path, f"missing: a Hugging Face model folder needs its {what}") from None
    except OSError as e:
        raise ModelFileProblem(path, f"cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ModelFileProblem(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ModelFileProblem(path, f"not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFileProblem(path, f"a JSON {type(data).__name__}, not an object")
    return data


def missing_tokenizer(folder) -> str:
    """What to say of a folder without tokenizer.json: where it holds a SentencePiece
    tokenizer.model instead (an older Llama's or Mistral's), that it is not read, and how to
    write the tokenizer.json transformers would make of it."""
    said = "missing: a Hugging Face model folder needs its tokenizer.json"
    if (Path(folder) / "tokenizer.model").is_file():
        said += (" (its tokenizer.model, a SentencePiece model, is not read: transformers' "
                 "AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER) writes tokenizer.json from it)")
    return said


# config.json's dtype names, as vLLM reads them (its _STR_DTYPE_TO_TORCH_DTYPE), and the safetensors ones
_CONFIG_DTYPES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32",
                  "float": "float32"}
_WEIGHT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def checkpoint_dtype(cfg: dict) -> str:
    """The dtype a config.json states its weights in (`torch_dtype`, or transformers 5's `dtype`):
    "float16", "bfloat16", "float32", or "" where it states none (or one that is no float dtype)."""
    value = cfg.get("torch_dtype", cfg.get("dtype"))
    return _CONFIG_DTYPES.get(value.removeprefix("torch."), "") if isinstance(value, str) else ""


def hf_config(folder) -> dict:
    """LlamaConfig fields from config.json (checked; tie_embeddings as the config says)."""
    path = Path(folder) / "config.json"
    cfg = read_json_object(path, "config.json")

    def fail(problem):
        raise ModelFileProblem(path, problem)

    mtype = cfg.get("model_type")
    if mtype is None:                      # say what is missing, not "model_type None"
        fail(f"it has no model_type; agp runs llama-family decoders ({', '.join(LLAMA_MODEL_TYPES)})")
    if mtype not in LLAMA_MODEL_TYPES:
        fail(f"model_type {mtype!r} is not a llama-family decoder ({', '.join(LLAMA_MODEL_TYPES)})")
    hf_quant_spec(cfg, path)               # a quantization_config agp cannot read: refused by its key
    gemma = mtype in GEMMA_MODEL_TYPES     # Gemma 3: its text model (model_files/gemma.py)
    stated = checkpoint_dtype(cfg)
    if gemma:
        cfg = hf_text_config(cfg, fail)
        stated = stated or checkpoint_dtype(cfg)
    # dynamic NTK scales past max_position_embeddings: the model type's default where it is left out
    theta, scaling = hf_rope({"max_position_embeddings": _MAX_POSITION.get(mtype, 2048), **cfg}, fail) \
        if not gemma else (1e6, ())   # Gemma's: hf_gemma_fields
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu" and not gemma:        # the MLP is SwiGLU: another activation is another model
        fail(f"hidden_act {json.dumps(act)} is not supported (agp's MLP is SwiGLU: 'silu')")
    qkv_bias = mtype == "qwen2"            # Qwen2 = llama + biases on q, k and v
    qk_norm = mtype == "qwen3"             # Qwen3 = llama + an RMSNorm over each head of q and k
    o_bias = False
    attention_bias = cfg.get("attention_bias", False)
    if attention_bias is not False:
        if attention_bias is not True:
            fail(f"'attention_bias' must be true or false, not {json.dumps(attention_bias)}")
        if mtype not in _ATTENTION_BIAS_TYPES:   # transformers' classes of these types have no such switch
            fail(f"'attention_bias' is true, but a {mtype} model has no attention biases to switch on "
                 f"(only {', '.join(_ATTENTION_BIAS_TYPES)} configs take it)")
        qkv_bias = o_bias = True           # transformers' LlamaAttention: q, k, v and o_proj all with a bias
    if cfg.get("mlp_bias", False) is not False:
        fail(f"'mlp_bias' is {json.dumps(cfg['mlp_bias'])}: agp's MLP layers have no bias terms")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if key not in cfg:
            fail(f"'{key}' is missing")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if hidden % heads:
            fail(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        head_dim = hidden // heads
    tie = cfg.get("tie_word_embeddings")   # None: not stated (then the weights decide)
    if tie is not None and not isinstance(tie, bool):
        fail(f"'tie_word_embeddings' must be true or false, not {json.dumps(tie)}")
    c = dict(vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
             num_layers=cfg["num_hidden_layers"], num_heads=heads,
             num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
             rope_theta=theta, rms_eps=cfg.get("rms_norm_eps", 1e-5),
             max_position=cfg.get("max_position_embeddings", _MAX_POSITION.get(mtype, 2048)),
             tie_embeddings=tie, rope_scaling=scaling,
             qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
             fused=mtype == "phi3", checkpoint_dtype=stated)   # Phi-3: q/k/v and gate/up fused
    if isinstance(c["max_position"], int) and not isinstance(c["max_position"], bool):
        c["max_position"] = scaled_context(c["max_position"], scaling)   # Gemma 3's is scaled already
    c = check_config(fail, c, HF_NAMES)
    if gemma:                              # the layer count checked first: the layer kinds list one each
        c = check_config(fail, {**c, **hf_gemma_fields(cfg, fail, c["num_layers"])}, HF_NAMES)
    # Qwen2's and Qwen3's configs have a sliding window only where use_sliding_window says so (their
    # transformers config classes' default: false); Mistral's and Phi-3's have no such switch
    windowed = cfg.get("use_sliding_window", mtype not in ("qwen2", "qwen3")) is not False
    window = cfg.get("sliding_window", _MISTRAL_WINDOW if mtype == "mistral" else None) \
        if windowed and not gemma else None
    if window is not None:
        # Mistral's layers attend to the last `sliding_window` tokens only; the engine's attend to
        # all. Up to the window the two are the same, so the context stops there (as vLLM did
        # before it computed sliding windows) instead of running a different model past it.
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            fail(f"'sliding_window' must be a positive integer or null, not {json.dumps(window)}")
        c["max_position"] = min(c["max_position"], window)
    if mtype == "phi3":                    # its partial rotary and longrope: model_files/phi3.py
        where, spec, _ = rope_spec(cfg, fail)
        c["rope_scaling"] = phi3.hf_scaling(fail, where, spec, cfg, c["head_dim"], c["max_position"])
    return c


def read_safetensors_header(path) -> dict:
    """name -> (dtype, shape) of a .safetensors file, its header checked against the file's size."""
    path = Path(path)

    def fail(problem):
        raise ModelFileProblem(path, problem)

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                fail("the file is empty" if size == 0 else "truncated: shorter than the 8-byte header length")
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8 or n > _ST_MAX_HEADER:
                fail(f"the header claims {n} bytes, more than the file's {size}: truncated, or not a "
                     f"safetensors file")
            raw = f.read(n)
    except OSError as e:
        fail(f"cannot read the file ({e.strerror or e})")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        fail("the header is not JSON: not a safetensors file")
    if not isinstance(header, dict):
        fail("the header is not a JSON object: not a safetensors file")
    data_size, out = size - 8 - n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in info["shape"]) \
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2 \
            and all(isinstance(d, int) for d in info["data_offsets"])
        if not ok:
            fail(f"tensor {name!r} has a malformed entry in the header: {json.dumps(info)[:120]}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            fail(f"the data of tensor {name!r} (bytes {begin}-{end}) runs past the end of the file's "
                 f"{data_size} data bytes: the file is truncated")
        if end - begin != math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]]:
            fail(f"tensor {name!r} holds {end - begin} bytes, not the {info['dtype']} {info['shape']} it declares")
        out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def weight_files(folder) -> list[Path]:
    """The folder's *.safetensors files, or, where model.safetensors.index.json is there, the
    shards its weight_map names (as transformers reads them): a repository that also ships
    its weights in another layout (Mistral's consolidated.safetensors) is not read twice."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return sorted(folder.glob("*.safetensors"))
    wmap = read_json_object(index, index.name).get("weight_map")
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise ModelFileProblem(index, "'weight_map' must be an object of tensor name -> shard file")
    files = []
    for name in sorted(set(wmap.values())):
        if Path(name).name != name or not (folder / name).is_file():
            raise ModelFileProblem(index, f"the weight_map names shard {name[:80]!r}, which is not a file "
                                          f"in the folder")
        files.append(folder / name)
    return files


def hf_quant_config(folder) -> QuantSpec | None:
    """How the folder's linear layers are quantized (config.json's quantization_config, checked:
    model_files/quantized.py), or None."""
    path = Path(folder) / "config.json"
    return hf_quant_spec(read_json_object(path, "config.json"), path)


def hf_llama_config(folder) -> dict:
    """LlamaConfig fields of an HF folder, after checking config.json and the header (names,
    shapes) of every *.safetensors file; tie_embeddings is True when there is no lm_head. The
    tensors of a quantized layer (AWQ's, GPTQ's, compressed-tensors') stand for its weight of the
    shape they unpack to."""
    folder = Path(folder)
    c = hf_config(folder)
    spec = hf_quant_config(folder)
    files = weight_files(folder)
    if not files:
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        raise ModelFileProblem(folder, "no *.safetensors weights in the folder" + (
            f" ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}: PyTorch's pickled checkpoint format, "
            f"which agp does not read, as loading one runs the code it holds; transformers' "
            f"save_pretrained() writes the same weights as model.safetensors)" if pickled else ""))
    found, where, quantized = {}, {}, {}
    gemma = bool(c.get("gemma"))
    stored = set()                         # the float dtypes of the weights, where config.json states none
    for f in files:
        for name, (dtype, shape) in read_safetensors_header(f).items():
            if dtype in _WEIGHT_DTYPES:
                stored.add(_WEIGHT_DTYPES[dtype])
            parts = quant_parts(name)
            if parts is not None and hf_engine_name(parts[0] + ".weight", gemma) is not None:
                quantized.setdefault(parts[0], {})[parts[1]] = (dtype, shape, f, name)
                continue
            mapped = hf_engine_name(name, gemma)
            if mapped is not None:
                check_extra(f, name, mapped, c)
                found[mapped], where[name] = (name, shape), f
    shapes = expected_shapes(c) if quantized else {}
    for module, parts in quantized.items():
        shape = check_quantized(spec, folder / "config.json", module, parts)
        mapped, name = hf_engine_name(module + ".weight", gemma), parts["qweight"][3]
        if mapped in found:
            raise ModelFileProblem(parts["qweight"][2], f"the folder holds both {found[mapped][0]!r} and "
                                                        f"quantized tensors of {module!r}")
        check_extra(parts["qweight"][2], name, mapped, c)
        need = shapes.get(mapped)
        if need is not None and tuple(shape) != need:      # said of the layer: the packed shape is another
            raise ModelFileProblem(parts["qweight"][2],
                                   f"tensor {name!r} has shape {list(parts['qweight'][1])}: a layer of {shape[1]} "
                                   f"inputs and {shape[0]} outputs, but config.json needs {need[1]} inputs and "
                                   f"{need[0]} outputs")
        found[mapped], where[name] = (name, shape), parts["qweight"][2]
    check_weights(folder, c, found, spell=lambda n: hf_file_name(n, gemma), file_of=lambda name: where.get(name, ""),
                  config="config.json")
    if c["tie_embeddings"] is False and "lm_head" not in found:
        # transformers would give such a model a freshly initialised (random) output layer; a
        # checkpoint missing a tensor it says it has is a broken copy, not a tied model
        raise ModelFileProblem(folder / "config.json", "it says tie_word_embeddings false, but no weights file "
                                                       "holds lm_head.weight (a checkpoint with a tensor missing?)")
    c["tie_embeddings"] = bool(c["tie_embeddings"]) or "lm_head" not in found
    if not c["checkpoint_dtype"] and stored:   # as vLLM reads the weights then: one dtype, or float32 for a mix
        c["checkpoint_dtype"] = stored.pop() if len(stored) == 1 else "float32"
    return c
