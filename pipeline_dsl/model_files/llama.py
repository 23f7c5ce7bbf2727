"""What the engine reads from a model: the metadata keys, the tensor names and shapes of a
llama model, and plausible config values; `gguf_llama_config` checks a GGUF header against
all of them and returns the LlamaConfig fields (a plain dict: no torch here)."""

from __future__ import annotations

import math

from .gguf_header import DEQUANTIZABLE, FLOAT_TYPES, INT_TYPES, VALUE_NAMES, GGUFHeader
from .problem import ModelFileProblem
from .rope import gguf_rope

# the GGUF metadata the engine reads (key -> kind); a model lacking a REQUIRED one cannot run
GGUF_USED_KEYS = {
    "general.architecture": "str", "llama.embedding_length": "int", "llama.attention.head_count": "int",
    "llama.feed_forward_length": "int", "llama.block_count": "int", "llama.attention.key_length": "int",
    "llama.attention.head_count_kv": "int", "llama.rope.freq_base": "float",
    "llama.attention.layer_norm_rms_epsilon": "float", "llama.context_length": "int",
    "tokenizer.ggml.model": "str", "tokenizer.ggml.tokens": "str[]", "tokenizer.ggml.token_type": "int[]",
    "tokenizer.ggml.merges": "str[]", "tokenizer.ggml.pre": "str", "tokenizer.ggml.bos_token_id": "int",
    "tokenizer.ggml.eos_token_id": "int", "tokenizer.ggml.eot_token_id": "int",
    "tokenizer.ggml.eom_token_id": "int", "tokenizer.chat_template": "str",
    "tokenizer.ggml.add_bos_token": "bool", "llama.rope.scaling.type": "str",
    "llama.rope.scaling.factor": "float", "llama.rope.dimension_count": "int",
}
GGUF_REQUIRED = ("general.architecture", "llama.embedding_length", "llama.attention.head_count",
                 "llama.feed_forward_length", "llama.block_count", "tokenizer.ggml.model",
                 "tokenizer.ggml.tokens")
_KINDS = {  # kind -> (type names that fit, in words)
    "str": ({"string"}, "a string"), "bool": ({"bool"}, "a bool"),
    "int": ({VALUE_NAMES[t] for t in INT_TYPES}, "an integer"),
    "float": ({VALUE_NAMES[t] for t in INT_TYPES | FLOAT_TYPES}, "a number"),
    "str[]": ({"array[string]"}, "an array of strings"),
    "int[]": ({f"array[{VALUE_NAMES[t]}]" for t in INT_TYPES}, "an array of integers"),
}

_GGUF_PARTS = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
               "ffn_norm": "ffn_norm", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
_HF_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
             "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
_GGUF_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
_HF_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}


def gguf_engine_name(name: str) -> str | None:
    """blk.3.attn_q.weight -> layers.3.q; None for a tensor the engine does not use."""
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in _GGUF_PARTS:
        return f"layers.{int(parts[1])}.{_GGUF_PARTS[parts[2]]}"
    return None


def hf_engine_name(name: str) -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> layers.3.q (.bias -> layers.3.q_bias); None for
    one the engine does not use."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    for suffix, tail in ((".weight", ""), (".bias", "_bias")):
        if name.startswith("model.layers.") and name.endswith(suffix):
            idx, _, part = name[len("model.layers."):-len(suffix)].partition(".")
            if idx.isdigit() and part in _HF_PARTS:
                return f"layers.{int(idx)}.{_HF_PARTS[part]}{tail}"
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
    return _spell(engine_name, _GGUF_TOP, _GGUF_PARTS, "blk.{i}.{part}.weight")


def hf_file_name(engine_name: str) -> str:
    return _spell(engine_name, _HF_TOP, _HF_PARTS, "model.layers.{i}.{part}.weight")


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


# how each file kind spells the LlamaConfig fields, for messages
_GGUF_NAMES = {
    "vocab_size": "the rows of 'token_embd.weight'", "hidden_size": "'llama.embedding_length'",
    "intermediate_size": "'llama.feed_forward_length'", "num_layers": "'llama.block_count'",
    "num_heads": "'llama.attention.head_count'", "num_kv_heads": "'llama.attention.head_count_kv'",
    "head_dim": "the head size", "rope_theta": "'llama.rope.freq_base'",
    "rms_eps": "'llama.attention.layer_norm_rms_epsilon'", "max_position": "'llama.context_length'",
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
    return c


def gguf_llama_config(h: GGUFHeader) -> dict:
    """LlamaConfig fields of a llama GGUF, after checking its metadata and every tensor the
    engine uses (name, shape, type). Raises ModelFileProblem."""
    def fail(problem):
        raise ModelFileProblem(h.path, problem)

    for key, why in h.unreadable.items():
        if key in GGUF_USED_KEYS:
            fail(f"metadata {key!r} cannot be read: {why}")
    arch = h.metadata.get("general.architecture")
    if arch is not None and arch != "llama":
        fail(f"architecture {arch!r} is not supported: this engine runs llama-family models")
    missing = [k for k in GGUF_REQUIRED if k not in h.types]
    if missing:
        fail(f"the metadata lacks {', '.join(map(repr, missing))} (a llama model needs it)")
    for key, kind in GGUF_USED_KEYS.items():
        fits, words = _KINDS[kind]
        if key in h.types and h.types[key] not in fits:
            fail(f"metadata {key!r} is {h.types[key]}, expected {words}")
    tok_model = h.metadata["tokenizer.ggml.model"]
    if tok_model != "gpt2":
        fail(f"tokenizer model {tok_model!r} is not supported (byte-level BPE 'gpt2' is)")

    m = h.metadata
    found = {}
    for t in h.tensors:
        name = gguf_engine_name(t.name)
        if name is not None:
            found[name] = (t.name, t.shape)
            if t.type_name not in DEQUANTIZABLE:
                fail(f"tensor {t.name!r} has type {t.type_name}, which this engine cannot turn into weights")
    if "embed" not in found:
        fail("missing tensors: token_embd.weight")
    hidden, heads = m["llama.embedding_length"], m["llama.attention.head_count"]
    head_dim = m.get("llama.attention.key_length")
    if head_dim is None:
        if not heads or hidden % heads:
            fail(f"'llama.embedding_length' {hidden} is not a multiple of 'llama.attention.head_count' {heads}")
        head_dim = hidden // heads
    theta, scaling = gguf_rope(m, fail, head_dim)
    c = dict(vocab_size=found["embed"][1][0], hidden_size=hidden,
             intermediate_size=m["llama.feed_forward_length"], num_layers=m["llama.block_count"],
             num_heads=heads, num_kv_heads=m.get("llama.attention.head_count_kv", heads), head_dim=head_dim,
             rope_theta=theta,
             rms_eps=m.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
             max_position=m.get("llama.context_length", 2048), tie_embeddings="lm_head" not in found,
             rope_scaling=scaling)
    c = check_config(fail, c, _GGUF_NAMES)
    n_tokens = len(m["tokenizer.ggml.tokens"])
    if n_tokens > c["vocab_size"]:
        fail(f"the tokenizer has {n_tokens} tokens but 'token_embd.weight' only {c['vocab_size']} rows")
    check_weights(h.path, c, found)
    freqs = next((t for t in h.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and (tuple(freqs.shape) != (c["head_dim"] // 2,) or freqs.type_name not in DEQUANTIZABLE):
        fail(f"tensor 'rope_freqs.weight' has shape {list(freqs.shape)} and type {freqs.type_name}; "
             f"the rotary factors need [{c['head_dim'] // 2}] numbers")
    return c
