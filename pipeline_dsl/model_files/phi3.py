"""Phi-3, Phi-3.5 and Phi-4-mini (HF model_type `phi3`, GGUF architecture `phi3`): what sets
them apart from a llama, read from their files (stdlib only: `agp check` reads these too).

    q, k, v   one fused projection: HF `self_attn.qkv_proj`, GGUF `blk.N.attn_qkv`, rows
              [q heads | k heads | v heads] (transformers' Phi3Attention slices it so)
    gate, up  one fused projection: HF `mlp.gate_up_proj`, GGUF `blk.N.ffn_up` (2 x the
              feed-forward length), rows [gate | up] (Phi3MLP's chunk(2); llama.cpp's swiglu)
    rotary    `partial_rotary_factor` (Phi-4-mini: 0.75): the first int(head_dim * factor) dims
              of each head rotate ("rotate half" over those dims: pairs i, i + dims/2), the
              rest pass as they are; GGUF: `phi3.rope.dimension_count` below the head size
    longrope  Phi-3-mini-128k, Phi-3.5, Phi-4-mini: a short and a long factor per frequency
              (frequency i divided by it) and an attention factor multiplying cos and sin
              (sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), factor = context /
              original unless given); GGUF: rope_factors_short/long tensors and
              phi3.rope.scaling.attn_factor / original_context_length

The loader splits the fused weights into the engine's q, k, v, gate and up (engine/phi3.py)
and, for a partial rotary, reorders the dims of every q and k head so that the rotated ones
sit where the engine's "rotate half" of the whole head pairs them; the others get frequency 0
(cos 1, sin 0: left as they are). q.k over a head is the same sum in any common order of its
dims, so attention is unchanged, and every attention path (eager, native kernels, CUDA graphs,
flex) runs it through the model's one pair of cos/sin tables.

Which longrope factors: transformers picks them per forward by the sequence's length (long
once it is past original_max_position_embeddings, and then recomputes the whole cache with
them); agp builds one table for the model, as llama.cpp does for its context: the long
factors when the model's context is past the original one, else the short ones. A KV cache
never mixes the two.
"""

from __future__ import annotations

import json
import math

from .gguf_header import DEQUANTIZABLE
from .rope import positive

# the GGUF metadata a phi3 file adds (key under "phi3." -> kind)
GGUF_KEYS = {"rope.scaling.attn_factor": "float", "rope.scaling.original_context_length": "int",
             "attention.sliding_window": "int"}
GGUF_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")
# transformers' Phi3Config's values for a config.json that leaves them out
HF_DEFAULTS = {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096}


def rotary_dims(fail, head_dim: int, factor) -> int:
    """The rotated dims of a head for a partial_rotary_factor (transformers: int(head_dim * factor))."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        fail(f"partial_rotary_factor must be a number in (0, 1], not {json.dumps(factor)}")
    dims = int(head_dim * factor)
    if dims < 2 or dims % 2:
        fail(f"partial_rotary_factor {factor} rotates {dims} of the head's {head_dim} dims: the rotary "
             f"needs an even number of them")
    return dims


def _factors(fail, where: str, key: str, value, n: int) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(
            not isinstance(f, bool) and isinstance(f, (int, float)) and 0 < f < math.inf for f in value):
        fail(f"{where} '{key}' must be a list of {n} positive numbers (one per rotary frequency), not "
             f"{json.dumps(value)[:80]}")
    return tuple(float(f) for f in value)


def longrope_attention(fail, factor: float, original: int, original_name: str, attn_name: str) -> float:
    """longrope's attention factor where the file gives none, as transformers computes it:
    sqrt(1 + ln(factor) / ln(original)), 1 for a factor up to 1."""
    if factor <= 1.0:
        return 1.0
    if original < 2:    # ln 1 = 0: transformers divides by zero
        fail(f"{original_name} is {original}: longrope's attention factor sqrt(1 + ln(factor) / ln(original)) "
             f"needs it to be at least 2, or {attn_name} given")
    return math.sqrt(1 + math.log(factor) / math.log(original))


def scaling_pairs(dims: int, head_dim: int, context: int, *, short, long, original: int,
                  attention_factor: float) -> tuple:
    """The model_files.rope scaling pairs of a phi3 rotary: its rotated dims (where partial),
    and for longrope the factors agp's one table takes (long when `context` is past `original`)
    with the attention factor."""
    pairs = (("rotary_dims", dims),) if dims != head_dim else ()
    if short is None:
        return pairs
    chosen = long if context > original else short
    return (*pairs, ("rope_type", "longrope"), ("original_max_position_embeddings", original),
            ("long", context > original), ("attention_factor", attention_factor), ("factors", chosen))


def hf_scaling(fail, where: str, spec: dict, cfg: dict, head_dim: int, context: int) -> tuple:
    """The scaling pairs of a phi3 config.json: `spec` its rope_scaling/rope_parameters (the
    rope_type already read: default or longrope), `context` agp's (after the sliding window)."""
    partial = spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    dims = rotary_dims(fail, head_dim, partial)
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ("longrope", "su", "yarn"):     # su and yarn: Phi3Config's old names of longrope
        return scaling_pairs(dims, head_dim, context, short=None, long=None, original=0, attention_factor=1.0)
    # transformers' Phi3Config: original_max_position_embeddings outside the rope dict wins, and
    # where the config has none, Phi3Config's default does (the rope dict's is not read)
    original = cfg.get("original_max_position_embeddings", HF_DEFAULTS["original_max_position_embeddings"])
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        fail(f"'original_max_position_embeddings' must be a positive integer for a longrope rotary, not "
             f"{json.dumps(original)}")
    short = _factors(fail, where, "short_factor", spec.get("short_factor"), dims // 2)
    long = _factors(fail, where, "long_factor", spec.get("long_factor"), dims // 2)
    factor = spec.get("factor")
    if factor is None:
        factor = cfg.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"]) / original
    else:
        factor = positive(fail, where, "factor", factor)
    attn = spec.get("attention_factor")
    if attn is None:
        attn = longrope_attention(fail, factor, original, "'original_max_position_embeddings'",
                                f"{where} 'attention_factor'")
    else:
        attn = positive(fail, where, "attention_factor", attn)
    return scaling_pairs(dims, head_dim, context, short=short, long=long, original=original,
                         attention_factor=float(attn))


def gguf_scaling(fail, m: dict, tensors: dict, head_dim: int, context: int) -> tuple:
    """The scaling pairs of a phi3 GGUF header (`tensors`: name -> info), less the factors'
    values, which the loader reads from the tensor `gguf_factor_tensor` names."""
    dims = m.get("phi3.rope.dimension_count", head_dim)
    if not 2 <= dims <= head_dim or dims % 2:
        fail(f"metadata 'phi3.rope.dimension_count' is {dims}: the rotary needs an even number of dims up to "
             f"the head size {head_dim}")
    have = [n for n in GGUF_FACTORS if n in tensors]
    if not have:
        return scaling_pairs(dims, head_dim, context, short=None, long=None, original=0, attention_factor=1.0)
    if len(have) == 1:
        fail(f"tensor {have[0]!r} is there without {next(n for n in GGUF_FACTORS if n not in have)!r}: "
             f"longrope needs both")
    for name in GGUF_FACTORS:
        t = tensors[name]
        if tuple(t.shape) != (dims // 2,) or t.type_name not in DEQUANTIZABLE:
            fail(f"tensor {name!r} has shape {list(t.shape)} and type {t.type_name}; the rotary factors need "
                 f"[{dims // 2}] numbers")
    key = "phi3.rope.scaling.original_context_length"
    original = m.get(key)
    if original is None:
        fail(f"the metadata lacks {key!r} (longrope needs it)")
    if original < 1:
        fail(f"metadata {key!r} is {original}: it must be a positive integer (the context longrope's "
             f"factors extend)")
    attn = m.get("phi3.rope.scaling.attn_factor")
    if attn is None:    # as transformers computes it from the two contexts
        factor = m.get("phi3.context_length", context) / original
        attn = longrope_attention(fail, factor, original, f"metadata {key!r}",
                                  "metadata 'phi3.rope.scaling.attn_factor'")
    if not 0 < attn < math.inf:
        fail(f"metadata 'phi3.rope.scaling.attn_factor' must be a positive number, not {attn}")
    placeholder = (1.0,) * (dims // 2)        # the loader puts the tensor's values here
    return scaling_pairs(dims, head_dim, context, short=placeholder, long=placeholder, original=original,
                         attention_factor=float(attn))


def gguf_factor_tensor(scaling: tuple) -> str | None:
    """The GGUF tensor whose values are the factors of `scaling` (None: no longrope)."""
    s = dict(scaling)
    return None if s.get("rope_type") != "longrope" else GGUF_FACTORS[1] if s["long"] else GGUF_FACTORS[0]
