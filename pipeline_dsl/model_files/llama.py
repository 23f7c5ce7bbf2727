"""What the engine reads from a model: the metadata keys, the tensor names and shapes of a
llama model, and plausible config values; `gguf_llama_config` checks a GGUF header against
all of them and returns the LlamaConfig fields (a plain dict: no torch here)."""

from __future__ import annotations

import math

from . import phi3
from .gguf_header import DEQUANTIZABLE, FLOAT_TYPES, INT_TYPES, VALUE_NAMES, GGUFHeader
from .problem import ModelFileProblem
from .rope import gguf_rope, scaled_context

# the GGUF architectures the engine runs -> (biases on Q, K and V; llama.cpp's converter
# permuted the Q/K rows, as it does for a rotary of interleaved pairs; an RMSNorm over each
# head of Q and K before the rotary): Qwen2 = llama + biases, Qwen3 = llama + the per-head norms,
# Phi-3 = llama with Q/K/V and gate/up fused, a partial rotary and longrope (model_files/phi3.py);
# Gemma 3 has the per-head norms and more (model_files/gemma.py)
GGUF_ARCHITECTURES = {"llama": (False, True, False), "qwen2": (True, False, False), "qwen3": (False, False, True),
                      "phi3": (False, False, False), "gemma3": (False, False, True)}
# the tokenizers the engine builds (tokenizer.ggml.model): byte-level BPE, SentencePiece
GGUF_TOKENIZERS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}
# the GGUF metadata the engine reads (key -> kind), the model's under its architecture's name
# ("{arch}.block_count"); a model lacking a REQUIRED one cannot run
_MODEL_KEYS = {
    "embedding_length": "int", "attention.head_count": "int", "feed_forward_length": "int",
    "block_count": "int", "attention.key_length": "int", "attention.head_count_kv": "int",
    "rope.freq_base": "float", "attention.layer_norm_rms_epsilon": "float", "context_length": "int",
    "rope.scaling.type": "str", "rope.scaling.factor": "float", "rope.dimension_count": "int",
    "attention.sliding_window": "int", "rope.scaling.attn_factor": "float",
    "rope.scaling.original_context_length": "int", "rope.scaling.yarn_ext_factor": "float",
    "rope.scaling.yarn_attn_factor": "float", "rope.scaling.yarn_beta_fast": "float",
    "rope.scaling.yarn_beta_slow": "float", "rope.scaling.yarn_log_multiplier": "float",
}
_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "str", "tokenizer.ggml.tokens": "str[]", "tokenizer.ggml.token_type": "int[]",
    "tokenizer.ggml.scores": "float[]", "tokenizer.ggml.merges": "str[]", "tokenizer.ggml.pre": "str",
    "tokenizer.ggml.bos_token_id": "int", "tokenizer.ggml.eos_token_id": "int",
    "tokenizer.ggml.eot_token_id": "int", "tokenizer.ggml.eom_token_id": "int",
    "tokenizer.ggml.unknown_token_id": "int", "tokenizer.ggml.padding_token_id": "int",
    "tokenizer.chat_template": "str", "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool", "tokenizer.ggml.add_space_prefix": "bool",
}
_MODEL_REQUIRED = ("embedding_length", "attention.head_count", "feed_forward_length", "block_count")
_TOKENIZER_REQUIRED = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")


def gguf_used_keys(arch: str) -> dict:
    """The metadata the engine reads from a GGUF of architecture `arch` (key -> kind)."""
    own = phi3.GGUF_KEYS if arch == "phi3" else {}
    return {"general.architecture": "str", **{f"{arch}.{k}": kind for k, kind in {**_MODEL_KEYS, **own}.items()},
            **_TOKENIZER_KEYS}


def gguf_required(arch: str) -> tuple:
    """The metadata a GGUF of architecture `arch` cannot run without."""
    return ("general.architecture", *(f"{arch}.{k}" for k in _MODEL_REQUIRED), *_TOKENIZER_REQUIRED)


_KINDS = {  # kind -> (type names that fit, in words)
    "str": ({"string"}, "a string"), "bool": ({"bool"}, "a bool"),
    "int": ({VALUE_NAMES[t] for t in INT_TYPES}, "an integer"),
    "float": ({VALUE_NAMES[t] for t in INT_TYPES | FLOAT_TYPES}, "a number"),
    "str[]": ({"array[string]"}, "an array of strings"),
    "int[]": ({f"array[{VALUE_NAMES[t]}]" for t in INT_TYPES}, "an array of integers"),
    "float[]": ({f"array[{VALUE_NAMES[t]}]" for t in INT_TYPES | FLOAT_TYPES}, "an array of numbers"),
}

_GGUF_PARTS = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
               "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "attn_qkv": "qkv",
               "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_ffw_norm"}   # Gemma 3's
_HF_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
             "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
             "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
             "self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"}
# Gemma 3's four norms a layer: its post_attention_layernorm follows attention (llama's precedes the MLP)
GEMMA_HF_PARTS = {"post_attention_layernorm": "post_attn_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}
_GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
_HF_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}


def gguf_engine_name(name: str, arch: str = "llama") -> str | None:
    """blk.3.attn_q.weight -> layers.3.q (.bias -> layers.3.q_bias, attn_q_norm -> q_norm; a
    phi3's attn_qkv -> qkv, ffn_up -> gate_up); None for a tensor the engine does not use."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias") \
            and parts[2] in _GGUF_PARTS:
        part = "gate_up" if arch == "phi3" and parts[2] == "ffn_up" else _GGUF_PARTS[parts[2]]
        return f"layers.{int(parts[1])}.{part}{'_bias' if parts[3] == 'bias' else ''}"
    return None


def hf_engine_name(name: str, gemma: bool = False) -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> layers.3.q (.bias -> layers.3.q_bias); None for
    one the engine does not use. `gemma`: Gemma 3's names (model_files/gemma.py)."""
    if gemma:
        from .gemma import hf_gemma_name

        name = hf_gemma_name(name)
        if name is None:
            return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = _HF_PARTS if not gemma else {**_HF_PARTS, **GEMMA_HF_PARTS}
    for suffix, tail in ((".weight", ""), (".bias", "_bias")):
        if name.startswith("model.layers.") and name.endswith(suffix):
            idx, _, part = name[len("model.layers."):-len(suffix)].partition(".")
            if idx.isdigit() and part in parts:
                return f"layers.{int(idx)}.{parts[part]}{tail}"
    return None


def expected_shapes(c: dict) -> dict:
    """Engine name -> numpy shape of every weight of a llama model with config fields `c`."""
    H, I, V, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_heads"] * hd, c["num_kv_heads"] * hd
    shapes = {"embed": (V, H), "norm": (H,), "lm_head": (V, H)}
    per_layer = {"attn_norm": (H,), "q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q),
                 "ffn_norm": (H,), "gate": (I, H), "up": (I, H), "down": (H, I)}
    if c.get("qkv_bias"):          # Qwen2: biases on the Q, K and V projections
        per_layer.update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
    if c.get("o_bias"):            # a llama's attention_bias: on the output projection too
        per_layer.update(o_bias=(H,))
    if c.get("qk_norm"):           # Qwen3: an RMSNorm over each head of Q and of K (one weight per head size)
        per_layer.update(q_norm=(hd,), k_norm=(hd,))
    if c.get("fused"):             # Phi-3: [q | k | v] and [gate | up] in one tensor each
        for part in ("q", "k", "v", "gate", "up"):
            del per_layer[part]
        per_layer.update(qkv=(q + 2 * kv, H), gate_up=(2 * I, H))
    if c.get("gemma"):             # Gemma 3: norms of the attention's and the MLP's outputs too
        per_layer.update(post_attn_norm=(H,), post_ffw_norm=(H,))
    for i in range(c["num_layers"]):
        shapes.update({f"layers.{i}.{p}": s for p, s in per_layer.items()})
    return shapes


def _spell(engine_name: str, top: dict, parts: dict, layer: str) -> str:
    """An engine name as a file spells it (layers.1.down -> blk.1.ffn_down.weight)."""
    for theirs, ours in top.items():
        if ours == engine_name:
            return theirs
    _, i, part = engine_name.split(".")
    if part.endswith("_bias"):
        return layer.format(i=i, part=next(t for t, o in parts.items() if o == part[:-5])).replace(".weight", ".bias")
    return layer.format(i=i, part=next(t for t, o in parts.items() if o == part))


def gguf_file_name(engine_name: str) -> str:
    if engine_name.endswith(".gate_up"):    # phi3's ffn_up holds gate and up
        return f"blk.{engine_name.split('.')[1]}.ffn_up.weight"
    return _spell(engine_name, _GGUF_TOP, _GGUF_PARTS, "blk.{i}.{part}.weight")


def hf_file_name(engine_name: str, gemma: bool = False) -> str:
    parts = _HF_PARTS if not gemma else {**{k: v for k, v in _HF_PARTS.items() if v != "ffn_norm"}, **GEMMA_HF_PARTS}
    return _spell(engine_name, _HF_TOP, parts, "model.layers.{i}.{part}.weight")


def check_extra(path, name: str, engine_name: str, c: dict) -> None:
    """A tensor (`name`, the file's; `engine_name`, ours) the engine would run without is an
    error: a bias (only Q, K and V have one, and only in a model whose config says so: Qwen2),
    or a per-head norm of Q or K in a model that has none (only Qwen3's has)."""
    part = engine_name.rsplit(".", 1)[-1]
    if part.endswith("_bias") and not (c.get("qkv_bias") and part in ("q_bias", "k_bias", "v_bias")
                                       or c.get("o_bias") and part == "o_bias"):
        raise ModelFileProblem(path, f"tensor {name!r} is a bias: agp's linear layers and norms have none "
                                     f"(but Qwen2's q, k, v, and q, k, v, o of a config with attention_bias), "
                                     f"so this model would run without it")
    if part in ("qkv", "gate_up") and not c.get("fused"):
        raise ModelFileProblem(path, f"tensor {name!r} holds {'q, k and v' if part == 'qkv' else 'gate and up'} in "
                                     f"one, which only a phi3 model has: this model would run without it")
    if part in ("q", "k", "v", "gate", "up") and c.get("fused"):
        fused = "q, k and v" if part in ("q", "k", "v") else "gate and up"
        raise ModelFileProblem(path, f"tensor {name!r} is a projection of {part} alone, but a phi3 model holds "
                                     f"{fused} in one tensor: this model would run without it")
    if part in ("q_norm", "k_norm") and not c.get("qk_norm"):
        raise ModelFileProblem(path, f"tensor {name!r} is an RMSNorm over each head of {part[0]}, which only "
                                     f"a qwen3 model has: this model would run without it")
    if part in ("post_attn_norm", "post_ffw_norm") and not c.get("gemma"):
        raise ModelFileProblem(path, f"tensor {name!r} is a norm of the {'attention' if 'attn' in part else 'MLP'}'s "
                                     f"output, which only a gemma3 model has: this model would run without it")


def check_weights(path, c: dict, found: dict, *, spell=gguf_file_name, file_of=lambda name: "",
                  config: str = "the metadata") -> None:
    """Every weight the engine needs is in `found` (engine name -> (file's name, shape)) with
    the shape that `config` (where the dimensions came from, for the message) implies;
    `spell` turns an engine name into the file's, `file_of` a file's name into its file."""
    want = expected_shapes(c)
    missing = [spell(n) for n in want if n != "lm_head" and n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelFileProblem(path, f"missing tensors: {', '.join(missing[:3])}{more}")
    for name, shape in want.items():   # in the model's order: the first wrong one is reported
        if name in found and tuple(found[name][1]) != shape:
            theirs = found[name][0]
            raise ModelFileProblem(file_of(theirs) or path,
                                   f"tensor {theirs!r} has shape {list(found[name][1])}, but {config} "
                                   f"needs {list(shape)}")


# how each file kind spells the LlamaConfig fields, for messages (a GGUF's under its architecture)
_GGUF_NAMES = {
    "vocab_size": "the rows of 'token_embd.weight'", "hidden_size": "'{arch}.embedding_length'",
    "intermediate_size": "'{arch}.feed_forward_length'", "num_layers": "'{arch}.block_count'",
    "num_heads": "'{arch}.attention.head_count'", "num_kv_heads": "'{arch}.attention.head_count_kv'",
    "head_dim": "the head size", "rope_theta": "'{arch}.rope.freq_base'",
    "rms_eps": "'{arch}.attention.layer_norm_rms_epsilon'", "max_position": "'{arch}.context_length'",
}
HF_NAMES = {
    "vocab_size": "'vocab_size'", "hidden_size": "'hidden_size'", "intermediate_size": "'intermediate_size'",
    "num_layers": "'num_hidden_layers'", "num_heads": "'num_attention_heads'",
    "num_kv_heads": "'num_key_value_heads'", "head_dim": "'head_dim'", "rope_theta": "'rope_theta'",
    "rms_eps": "'rms_norm_eps'", "max_position": "'max_position_embeddings'",
}


def check_config(fail, c: dict, names: dict) -> dict:
    """Plausible LlamaConfig fields (an absurd value would allocate GBs or divide wrongly);
    `names`: field -> how the file spells it, for the message."""
    limits = {"vocab_size": 1 << 24, "hidden_size": 1 << 18, "intermediate_size": 1 << 20,
              "num_layers": 1 << 12, "num_heads": 1 << 12, "num_kv_heads": 1 << 12, "head_dim": 1 << 12,
              "max_position": 1 << 24}
    for name, top in limits.items():
        v = c[name]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            fail(f"{names[name]} must be an integer from 1 to {top}, not {v!r}")
    for name in ("rope_theta", "rms_eps"):
        v = c[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
            fail(f"{names[name]} must be a positive number, not {v!r}")
    if c["num_heads"] % c["num_kv_heads"]:
        fail(f"{c['num_heads']} attention heads cannot be shared by {c['num_kv_heads']} KV heads")
    if c["head_dim"] % 2:
        fail(f"the head size {c['head_dim']} is odd (rotary embeddings need an even size)")
    c["rope_theta"], c["rms_eps"] = float(c["rope_theta"]), float(c["rms_eps"])
    c.setdefault("qkv_bias", False)
    c.setdefault("o_bias", False)
    c.setdefault("checkpoint_dtype", "")
    c.setdefault("qk_norm", False)
    c.setdefault("fused", False)
    for key, value in (("gemma", False), ("sliding_window", 0), ("window_layers", ()), ("rope_local_theta", 10000.0),
                       ("attn_scale", 0.0)):   # Gemma 3's (model_files/gemma.py); a llama's have none
        c.setdefault(key, value)
    return c


def gguf_llama_config(h: GGUFHeader) -> dict:
    """LlamaConfig fields of a llama-family GGUF (GGUF_ARCHITECTURES), after checking its
    metadata and every tensor the engine uses (name, shape, type). Raises ModelFileProblem."""
    def fail(problem):
        raise ModelFileProblem(h.path, problem)

    arch = h.metadata.get("general.architecture", "llama")
    if arch not in GGUF_ARCHITECTURES:
        fail(f"metadata 'general.architecture' {arch!r} is not supported: this engine runs llama-family "
             f"models ({', '.join(map(repr, GGUF_ARCHITECTURES))})")
    used = gguf_used_keys(arch)
    for key, why in h.unreadable.items():
        if key in used:
            fail(f"metadata {key!r} cannot be read: {why}")
    missing = [k for k in gguf_required(arch) if k not in h.types]
    if missing:
        fail(f"the metadata lacks {', '.join(map(repr, missing))} (a {arch} model needs it)")
    for key, kind in used.items():
        fits, words = _KINDS[kind]
        if key in h.types and h.types[key] not in fits:
            fail(f"metadata {key!r} is {h.types[key]}, expected {words}")
    tok_model = h.metadata["tokenizer.ggml.model"]
    if tok_model not in GGUF_TOKENIZERS:
        known = " and ".join(f"{words} {name!r}" for name, words in GGUF_TOKENIZERS.items())
        fail(f"metadata 'tokenizer.ggml.model' {tok_model!r} is not supported: agp builds {known} tokenizers")
    if tok_model == "llama" and "tokenizer.ggml.merges" not in h.types and "tokenizer.ggml.scores" not in h.types:
        fail("the metadata lacks 'tokenizer.ggml.scores' (a SentencePiece tokenizer without merges needs "
             "its pieces' scores)")

    m, (qkv_bias, _, qk_norm) = h.metadata, GGUF_ARCHITECTURES[arch]
    fused = arch == "phi3"
    found = {}
    for t in h.tensors:
        name = gguf_engine_name(t.name, arch)
        if name is not None:
            check_extra(h.path, t.name, name, {"qkv_bias": qkv_bias, "qk_norm": qk_norm, "fused": fused,
                                               "gemma": arch == "gemma3"})
            found[name] = (t.name, t.shape)
            if t.type_name not in DEQUANTIZABLE:
                fail(f"tensor {t.name!r} has type {t.type_name}, which this engine cannot turn into weights")
    if "embed" not in found:
        fail("missing tensors: token_embd.weight")
    hidden, heads = m[f"{arch}.embedding_length"], m[f"{arch}.attention.head_count"]
    head_dim = m.get(f"{arch}.attention.key_length")
    if head_dim is None:
        if not heads or hidden % heads:
            fail(f"'{arch}.embedding_length' {hidden} is not a multiple of '{arch}.attention.head_count' {heads}")
        head_dim = hidden // heads
    theta, scaling = gguf_rope(m, fail, head_dim, arch)
    context = m.get(f"{arch}.context_length", 2048)
    # linear leaves context_length the context, as llama.cpp serves it (n_ctx_train: the factor only
    # divides the rotary frequencies) and vLLM reads a GGUF (no rope scaling in its config)
    if dict(scaling).get("rope_type") == "yarn":   # as a config.json's: the original context times the factor
        context = scaled_context(context, scaling)
    window = m.get("phi3.attention.sliding_window") if fused else None
    if window is not None and window > 0:   # as config.json's sliding_window (model_files/hf.py)
        context = min(context, window)
    if fused:
        if scaling or any(t.name == "rope_freqs.weight" for t in h.tensors):
            fail("a phi3 file's rotary is scaled by longrope's rope_factors_short/long alone, not by "
                 "'phi3.rope.scaling.type' or a rope_freqs tensor")
        scaling = phi3.gguf_scaling(fail, m, {t.name: t for t in h.tensors}, head_dim, context)
    else:       # longrope is a phi3's: another model would run plain RoPE without its factors
        stray = next((t.name for t in h.tensors if t.name in phi3.GGUF_FACTORS), None)
        if stray is not None:
            fail(f"tensor {stray!r} holds longrope's rotary factors, which agp computes for a phi3 model "
                 f"alone: this {arch} model would run without them")
        attn = m.get(f"{arch}.rope.scaling.attn_factor", 1.0)
        if attn != 1.0:
            fail(f"metadata '{arch}.rope.scaling.attn_factor' is {attn}: agp scales cos and sin by an attention "
                 f"factor for a phi3 model's longrope alone, so this {arch} model would run without it")
    c = dict(vocab_size=found["embed"][1][0], hidden_size=hidden,
             intermediate_size=m[f"{arch}.feed_forward_length"], num_layers=m[f"{arch}.block_count"],
             num_heads=heads, num_kv_heads=m.get(f"{arch}.attention.head_count_kv", heads), head_dim=head_dim,
             rope_theta=theta,
             rms_eps=m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
             max_position=context, tie_embeddings="lm_head" not in found,
             rope_scaling=scaling, qkv_bias=qkv_bias, qk_norm=qk_norm, fused=fused)
    names = {k: v.format(arch=arch) for k, v in _GGUF_NAMES.items()}
    c = check_config(fail, c, names)
    if arch == "gemma3":               # the layer count and head size checked first
        from .gemma import gguf_gemma_fields

        c = check_config(fail, {**c, **gguf_gemma_fields(m, fail, c)}, names)
    n_tokens = len(m["tokenizer.ggml.tokens"])
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):   # one entry per token
        if key in m and len(m[key]) != n_tokens:
            fail(f"metadata {key!r} has {len(m[key])} entries, but 'tokenizer.ggml.tokens' {n_tokens}")
    if n_tokens > c["vocab_size"]:
        fail(f"the tokenizer has {n_tokens} tokens but 'token_embd.weight' only {c['vocab_size']} rows")
    check_weights(h.path, c, found)
    freqs = next((t for t in h.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and (tuple(freqs.shape) != (c["head_dim"] // 2,) or freqs.type_name not in DEQUANTIZABLE):
        fail(f"tensor 'rope_freqs.weight' has shape {list(freqs.shape)} and type {freqs.type_name}; "
             f"the rotary factors need [{c['head_dim'] // 2}] numbers")
    return c
