"""Rotary embeddings as a model file describes them: the base (theta), the scaling of its
frequencies, and the frequencies themselves (stdlib only: `agp check` reads these too).

    theta, scaling = hf_rope(cfg, fail)        # config.json: rope_theta + rope_scaling, or
                                               # transformers >= 5's rope_parameters
    theta, scaling = gguf_rope(metadata, fail, head_dim, arch)  # {arch}.rope.freq_base + .rope.scaling.*
    inv_freq = rope_inv_freq(head_dim, theta, scaling)   # head_dim/2 floats, for the engine

`scaling` is a tuple of (key, value) pairs (hashable: it sits in a frozen LlamaConfig); () is
plain RoPE. The kinds the engine computes exactly as transformers and llama.cpp do:

    linear   every frequency divided by `factor` (position interpolation)
    llama3   Llama 3.1+: long wavelengths divided by `factor`, short ones kept, a smooth
             blend between (low_freq_factor, high_freq_factor, original_max_position_embeddings)
    factors  a GGUF's rope_freqs tensor: frequency i divided by factors[i] (llama.cpp's form
             of llama3 scaling; the loader adds the pair once it has read the tensor, beside
             a linear factor if the metadata has one too, as llama.cpp applies both)
    longrope phi3's: `factors` (its short or long ones) and an `attention_factor` on cos and
             sin; `rotary_dims`: a partial rotary (model_files/phi3.py)

Any other kind (dynamic, yarn, longrope outside phi3, …) changes what the model computes in ways the
engine does not follow, so it is refused rather than run as plain RoPE.
"""

from __future__ import annotations

import json
import math

SUPPORTED = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def positive(fail, where: str, key: str, value) -> float:
    """`value` as a float; fail naming `where` and `key` unless it is a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        fail(f"{where} '{key}' must be a positive number, not {json.dumps(value)}")
    return float(value)


def rope_spec(cfg: dict, fail) -> tuple[str, dict, float]:
    """(where, spec, rope_theta) of a config.json: `spec` the rope_scaling or rope_parameters
    object (theta taken out), `where` its name for messages. transformers < 5 writes
    `rope_theta` and `rope_scaling` at the top; 5 writes both inside `rope_parameters` (theta,
    rope_type, the scaling's keys), which wins where both are there, as transformers reads it."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        fail(f"rope_parameters must be an object or null, not {json.dumps(params)[:80]}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        fail(f"rope_scaling must be an object or null, not {json.dumps(scaling)[:80]}")
    where = "rope_parameters" if params else "rope_scaling"
    spec = dict(params or scaling or {})
    theta = spec.pop("rope_theta", None) if params else None
    theta = cfg.get("rope_theta", 10000.0) if theta is None else theta
    return where, spec, theta


def hf_rope(cfg: dict, fail) -> tuple[float, tuple]:
    """(rope_theta, scaling pairs) of a config.json (rope_spec). A phi3 config's longrope and
    partial rotary are model_files.phi3's (hf_scaling): here they pass as ()."""
    where, spec, theta = rope_spec(cfg, fail)
    phi3 = cfg.get("model_type") == "phi3"
    kind = spec.get("rope_type", spec.get("type", "default"))
    if phi3 and kind in ("su", "yarn"):     # Phi3Config reads these old names as longrope
        kind = "longrope"
    if kind not in SUPPORTED + (("longrope",) if phi3 else ()):
        fail(f"{where} {json.dumps(spec)[:160]}: rope_type {kind!r} is not supported "
             f"(agp computes {', '.join(SUPPORTED)}{', and longrope for phi3' if not phi3 else ''})")
    if phi3:
        if kind not in ("default", "longrope"):   # as Phi3Config validates it
            fail(f"{where}: rope_type {kind!r} is not a phi3 rotary (default or longrope)")
        return theta, ()
    partial = spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        fail(f"partial_rotary_factor {json.dumps(partial)} is not supported (agp rotates the whole head, "
             f"but a phi3 model's first dims)")
    if kind == "default":
        return theta, ()
    if kind == "linear":
        return theta, (("rope_type", "linear"), ("factor", positive(fail, where, "factor", spec.get("factor"))))
    values = tuple((k, positive(fail, where, k, spec.get(k))) for k in _LLAMA3_KEYS)
    if dict(values)["high_freq_factor"] <= dict(values)["low_freq_factor"]:
        fail(f"{where}: 'high_freq_factor' must be larger than 'low_freq_factor'")
    return theta, (("rope_type", "llama3"), *values)


def gguf_rope(m: dict, fail, head_dim: int, arch: str = "llama") -> tuple[object, tuple]:
    """(freq_base, scaling pairs) from a GGUF's metadata under its architecture's name
    (`llama.rope.scaling.type` linear, with `llama.rope.scaling.factor`, or none); a rope_freqs
    tensor is the loader's."""
    dims = m.get(f"{arch}.rope.dimension_count", head_dim)
    if dims != head_dim and arch != "phi3":     # a phi3's first dims: model_files.phi3.gguf_scaling
        fail(f"metadata '{arch}.rope.dimension_count' is {dims}, not the head size {head_dim}: "
             f"agp rotates the whole head (but a phi3 model's first dims)")
    theta = m.get(f"{arch}.rope.freq_base", 10000.0)
    kind = m.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return theta, ()
    if kind == "linear":
        return theta, (("rope_type", "linear"),
                       ("factor", positive(fail, "metadata", f"{arch}.rope.scaling.factor",
                                            m.get(f"{arch}.rope.scaling.factor"))))
    fail(f"metadata '{arch}.rope.scaling.type' {kind!r} is not supported (agp computes none and linear, "
         f"and a rope_freqs tensor)")
    raise AssertionError("unreachable")


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple = ()) -> list[float]:
    """The head_dim/2 rotary frequencies, scaled as `scaling` says (transformers'
    _compute_default/linear/llama3/longrope_parameters; llama.cpp's rope_freqs factors). With
    `rotary_dims` (a phi3's partial rotary) the frequencies of those dims, then 0 for the pairs
    that pass unrotated."""
    s = dict(scaling)
    dims = int(s.get("rotary_dims", head_dim))
    inv = [1.0 / theta ** (i / dims) for i in range(0, dims, 2)]
    if "factors" in s:
        inv = [f / d for f, d in zip(inv, s["factors"], strict=True)]
    return _scaled(inv, s) + [0.0] * ((head_dim - dims) // 2)


def rope_magnitudes(head_dim: int, scaling: tuple = ()) -> list[float]:
    """What cos and sin are multiplied by, per frequency (head_dim/2): longrope's attention
    factor for the rotated pairs (transformers' attention_scaling), 1 elsewhere."""
    s = dict(scaling)
    dims = int(s.get("rotary_dims", head_dim))
    return [float(s.get("attention_factor", 1.0))] * (dims // 2) + [1.0] * ((head_dim - dims) // 2)


def _scaled(inv: list[float], s: dict) -> list[float]:
    kind = s.get("rope_type")
    if kind == "linear":
        return [f / s["factor"] for f in inv]
    if kind != "llama3":
        return inv
    factor, low, high, old = (s[k] for k in _LLAMA3_KEYS)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:          # high frequencies: kept
            out.append(f)
        elif wavelen > low_wavelen:         # low frequencies: interpolated
            out.append(f / factor)
        else:                               # between: a blend of the two
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
