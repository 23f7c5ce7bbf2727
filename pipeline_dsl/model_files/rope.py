"""Rotary embeddings as a model file describes them: the base (theta), the scaling of its
frequencies, and the frequencies themselves (stdlib only: `agp check` reads these too).

    theta, scaling = hf_rope(cfg, fail)        # config.json: rope_theta + rope_scaling, or
                                               # transformers >= 5's rope_parameters
    theta, scaling = gguf_rope(metadata, fail, head_dim, arch)  # {arch}.rope.freq_base + .rope.scaling.*
    inv_freq = rope_inv_freq(head_dim, theta, scaling)   # head_dim/2 floats, for the engine
    base = rope_base(theta, scaling, head_dim, seq_len)  # dynamic's base once seq_len tokens are there

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
    yarn     YaRN (Qwen2.5's and Qwen3's long context): frequencies of fewer than `beta_slow`
             turns over `original_max_position_embeddings` divided by `factor`, those of more
             than `beta_fast` kept, a linear ramp between (over dims rounded outward unless
             `truncate` is false), and cos and sin times its `attention_factor` (0.1 ln(factor)
             + 1 where the config gives none; from `mscale` and `mscale_all_dim` where it gives
             both), at every position, as transformers computes it (and vLLM, which reads no
             attention_factor or mscale but its own attn_factor: refused unless 1). A GGUF's
             yarn is llama.cpp's keys for the same numbers (gguf_rope)
    dynamic  dynamic NTK: no scaling within `original_max_position_embeddings` (the config's
             max_position_embeddings); past it the base grows to theta * (factor * n / original
             - (factor - 1)) ** (d / (d - 2)) for a sequence of n tokens, as transformers'
             _compute_dynamic_ntk_parameters computes it. transformers recomputes it each forward
             from the longest position in that forward (and caches keys rotated with the base of
             their own forward); agp's tables give position p the base of a sequence of p + 1
             tokens (rope_base), which is what transformers computes decoding one token at a
             time, and does not depend on what else shares a batch, on chunked prefill or on a
             reused prefix. vLLM's DynamicNTKScalingRotaryEmbedding instead takes the base of
             factor * max_position_embeddings once for every position, short prompts included,
             where transformers (and the model's training) rotates them unscaled.

Any other kind (longrope outside phi3, …) changes what the model computes in ways the engine
does not follow, so it is refused rather than run as plain RoPE.
"""

from __future__ import annotations

import json
import math

SUPPORTED = ("default", "linear", "llama3", "yarn", "dynamic")
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
    if kind == "yarn":
        return theta, _yarn(fail, where, spec, cfg)
    if kind == "dynamic":
        original = cfg.get("max_position_embeddings")
        if "max_position_embeddings" not in cfg:
            fail(f"{where}: rope_type 'dynamic' scales past max_position_embeddings, which is missing")
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            fail(f"{where}: rope_type 'dynamic' scales past max_position_embeddings, which must be a positive "
                 f"integer, not {json.dumps(original)}")
        return theta, (("rope_type", "dynamic"), ("factor", positive(fail, where, "factor", spec.get("factor"))),
                       ("original_max_position_embeddings", float(original)))
    values = tuple((k, positive(fail, where, k, spec.get(k))) for k in _LLAMA3_KEYS)
    if dict(values)["high_freq_factor"] <= dict(values)["low_freq_factor"]:
        fail(f"{where}: 'high_freq_factor' must be larger than 'low_freq_factor'")
    return theta, (("rope_type", "llama3"), *values)


def scaled_context(max_position: int, scaling: tuple) -> int:
    """The context of a config.json's model under its rotary scaling, as vLLM derives it: linear's
    and dynamic's `factor` times max_position_embeddings, yarn's times its
    original_max_position_embeddings (a config that says 32768 with a yarn factor of 4 serves
    131072); llama3's (and a phi3's longrope) max_position_embeddings already is the scaled context."""
    s = dict(scaling)
    if s.get("rope_type") in ("linear", "dynamic"):
        return int(max_position * s["factor"])
    if s.get("rope_type") == "yarn":
        return int(s["original_max_position_embeddings"] * s["factor"])
    return max_position


def _yarn(fail, where: str, spec: dict, cfg: dict) -> tuple:
    """The scaling pairs of a yarn spec, its attention factor worked out as transformers'
    _compute_yarn_parameters does (`original_max_position_embeddings` at the top of the config
    wins, as transformers moves it in; left out, max_position_embeddings)."""
    original = cfg.get("original_max_position_embeddings", spec.get("original_max_position_embeddings",
                                                                     cfg.get("max_position_embeddings")))
    factor = positive(fail, where, "factor", spec.get("factor"))
    original = positive(fail, where, "original_max_position_embeddings", original)
    attention = spec.get("attention_factor")
    mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")
    if attention is not None:
        attention = positive(fail, where, "attention_factor", attention)
    elif mscale and mscale_all:
        attention = _yarn_mscale(factor, positive(fail, where, "mscale", mscale)) / \
            _yarn_mscale(factor, positive(fail, where, "mscale_all_dim", mscale_all))
    else:
        attention = _yarn_mscale(factor)
    betas = tuple((k, positive(fail, where, k, spec.get(k) or default)) for k, default in (("beta_fast", 32),
                                                                                        ("beta_slow", 1)))
    for key, neutral in (("attn_factor", 1), ("extrapolation_factor", 1), ("apply_yarn_scaling", True)):
        if spec.get(key, neutral) != neutral:    # vLLM's own keys, which transformers does not read
            fail(f"{where} '{key}' {json.dumps(spec[key])} is not supported (agp computes yarn as transformers "
                 f"does, which reads no '{key}')")
    truncate = spec.get("truncate", True)
    if not isinstance(truncate, bool):
        fail(f"{where} 'truncate' must be true or false, not {json.dumps(truncate)}")
    return (("rope_type", "yarn"), ("factor", factor), ("original_max_position_embeddings", original), *betas,
            ("truncate", truncate), ("attention_factor", float(attention)))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def gguf_rope(m: dict, fail, head_dim: int, arch: str = "llama") -> tuple[object, tuple]:
    """(freq_base, scaling pairs) from a GGUF's metadata under its architecture's name
    (`llama.rope.scaling.type` linear, with `llama.rope.scaling.factor`; yarn, with the keys
    of gguf_yarn; or none); a rope_freqs tensor is the loader's."""
    dims = m.get(f"{arch}.rope.dimension_count", head_dim)
    if dims != head_dim and arch != "phi3":     # a phi3's first dims: model_files.phi3.gguf_scaling
        fail(f"metadata '{arch}.rope.dimension_count' is {dims}, not the head size {head_dim}: "
             f"agp rotates the whole head (but a phi3 model's first dims)")
    theta = m.get(f"{arch}.rope.freq_base", 10000.0)
    kind = m.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return theta, ()
    if kind in ("linear", "yarn"):
        factor = positive(fail, "metadata", f"{arch}.rope.scaling.factor", m.get(f"{arch}.rope.scaling.factor"))
        return theta, ((("rope_type", "linear"), ("factor", factor)) if kind == "linear" else
                       gguf_yarn(m, fail, arch, factor))
    fail(f"metadata '{arch}.rope.scaling.type' {kind!r} is not supported (agp computes none, linear and yarn, "
         f"and a rope_freqs tensor)")
    raise AssertionError("unreachable")


def gguf_yarn(m: dict, fail, arch: str, factor: float) -> tuple:
    """The yarn scaling pairs of a GGUF, from the keys llama.cpp's converter writes for a
    config.json's yarn: `.rope.scaling.original_context_length` (left out: the file's
    context_length, as llama.cpp takes it), `.rope.scaling.yarn_beta_fast` / `yarn_beta_slow`
    (32 and 1) and `.rope.scaling.yarn_attn_factor` (the config's attention_factor; left out,
    0.1 ln(factor) + 1), computed as transformers computes the config's (a ramp truncated to
    whole dims, as llama.cpp's always is). `.rope.scaling.yarn_ext_factor` (vLLM's
    extrapolation_factor) must be 1, the whole ramp transformers computes; a
    `.rope.scaling.yarn_log_multiplier` (DeepSeek's mscale_all_dim, written as itself or a tenth
    of it by different converters, never for these architectures) is refused."""
    def key(name):
        return f"{arch}.rope.scaling.{name}"

    original = m.get(key("original_context_length"), m.get(f"{arch}.context_length", 2048))
    original = positive(fail, "metadata", key("original_context_length"), original)
    ext = m.get(key("yarn_ext_factor"), 1.0)
    if ext != 1.0:
        fail(f"metadata '{key('yarn_ext_factor')}' is {ext}: agp computes yarn as transformers does, with the "
             f"whole ramp between interpolated and kept frequencies (1)")
    if m.get(key("yarn_log_multiplier"), 0.0):
        fail(f"metadata '{key('yarn_log_multiplier')}' is {m[key('yarn_log_multiplier')]}: agp does not compute "
             f"DeepSeek's yarn attention scale (mscale_all_dim) for a {arch} model")
    betas = tuple((k, positive(fail, "metadata", key(f"yarn_{k}"), m.get(key(f"yarn_{k}"), default)))
                  for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0)))
    attention = m.get(key("yarn_attn_factor"))
    attention = _yarn_mscale(factor) if attention is None else \
        positive(fail, "metadata", key("yarn_attn_factor"), attention)
    return (("rope_type", "yarn"), ("factor", factor), ("original_max_position_embeddings", original), *betas,
            ("truncate", True), ("attention_factor", float(attention)))


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
    return _scaled(inv, s, theta) + [0.0] * ((head_dim - dims) // 2)


def rope_base(theta: float, scaling: tuple, head_dim: int, seq_len: int) -> float:
    """The rotary base of a sequence of `seq_len` tokens: `theta`, but under dynamic NTK past its
    original context, where it grows as transformers' _compute_dynamic_ntk_parameters grows it
    (the engine's tables give position p the base of p + 1 tokens: model.rope_table)."""
    s = dict(scaling)
    if s.get("rope_type") != "dynamic" or seq_len <= s["original_max_position_embeddings"]:
        return theta
    dims = int(s.get("rotary_dims", head_dim))
    factor = s["factor"]
    return theta * (factor * seq_len / s["original_max_position_embeddings"] - (factor - 1)) ** (dims / (dims - 2))


def rope_magnitudes(head_dim: int, scaling: tuple = ()) -> list[float]:
    """What cos and sin are multiplied by, per frequency (head_dim/2): longrope's attention
    factor for the rotated pairs (transformers' attention_scaling), 1 elsewhere."""
    s = dict(scaling)
    dims = int(s.get("rotary_dims", head_dim))
    return [float(s.get("attention_factor", 1.0))] * (dims // 2) + [1.0] * ((head_dim - dims) // 2)


def _scaled(inv: list[float], s: dict, theta: float) -> list[float]:
    kind = s.get("rope_type")
    if kind == "linear":
        return [f / s["factor"] for f in inv]
    if kind == "yarn":
        return _yarn_scaled(inv, s, theta)
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


def _yarn_scaled(inv: list[float], s: dict, theta: float) -> list[float]:
    """transformers' _compute_yarn_parameters on the frequencies `inv` (of the rotated dims)."""
    dims = 2 * len(inv)

    def dim_of(turns):       # the dim whose wavelength turns `turns` times over the original context
        return dims * math.log(s["original_max_position_embeddings"] / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s["beta_fast"]), dim_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(inv):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)     # 0: kept (extrapolated), 1: interpolated
        out.append(f / s["factor"] * ramp + f * (1 - ramp))
    return out
