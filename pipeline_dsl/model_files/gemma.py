"""Gemma 3's text models as a model file describes them (stdlib only: `agp check` reads these too).

A Gemma 3 decoder is a llama with more (transformers' Gemma3ForCausalLM, llama.cpp's gemma3):

    embeddings      scaled by sqrt(hidden_size) (in the model's dtype); the tied lm_head reads them unscaled
    RMSNorm         x * (1 + w): a config.json checkpoint stores w, and its loader adds the 1 (in float32,
                    as transformers computes it); llama.cpp's converter already added it to a GGUF's
    four norms      input (attn_norm), post_attention (post_attn_norm: the attention's output, before
                    the residual add), pre_feedforward (ffn_norm), post_feedforward (post_ffw_norm)
    q/k norms       an RMSNorm over each head of q and of k before the rotary (as Qwen3)
    MLP             GeGLU: down(gelu_tanh(gate) * up)
    attention       scaled by query_pre_attn_scalar ** -0.5; "sliding" layers see only the last
                    `sliding_window` keys (a key at position j is seen from position p when p - W < j <= p),
                    and rotate with their own base (rope_local_base_freq, never scaled); "full" layers with
                    rope_theta and the config's rope scaling

The LlamaConfig fields these add: gemma, sliding_window, window_layers (the indices of the sliding
layers), rope_local_theta and attn_scale.
"""

from __future__ import annotations

import json

from .rope import hf_rope

GEMMA_MODEL_TYPES = ("gemma3_text", "gemma3")
GEMMA_ACTIVATION = "gelu_pytorch_tanh"
# Gemma3TextConfig's defaults, for a config.json that leaves one out, as transformers fills them in
# (Gemma 3 4B's text_config states only its sizes that differ: hidden, MLP, layers, window, scaling)
_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                  "num_attention_heads": 8, "rms_norm_eps": 1e-6, "head_dim": 256, "max_position_embeddings": 131072,
                  "num_key_value_heads": 4, "hidden_activation": GEMMA_ACTIVATION, "query_pre_attn_scalar": 256,
                  "sliding_window": 4096, "tie_word_embeddings": True}
# a multimodal gemma3 checkpoint's language model under transformers 4's and 5's names; its vision
# tower and projector are not the text model's
_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def hf_gemma_name(name: str) -> str | None:
    """A gemma3 checkpoint's tensor name as a text model's (model.layers.…), or None for a vision one
    (the vision tower's, the projector's); a gemma3_text checkpoint's names are the text model's."""
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None if name.startswith(_VISION_PREFIXES) else name


def hf_text_config(cfg: dict, fail) -> dict:
    """The text model's config of a gemma3_text config.json, or of a gemma3 (multimodal) one's
    text_config, with Gemma3TextConfig's defaults where a key is missing."""
    if cfg.get("model_type") == "gemma3":
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            fail("model_type 'gemma3' needs a 'text_config' object (the language model agp runs)")
        outer, cfg = cfg, {**text, "model_type": "gemma3_text"}
        # the multimodal config may state the tie for the whole model, and its text config not
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in outer:
            cfg["tie_word_embeddings"] = outer["tie_word_embeddings"]
    return {**_TEXT_DEFAULTS, **cfg}


def hf_gemma_fields(cfg: dict, fail, num_layers) -> dict:
    """(fields of LlamaConfig) of a Gemma 3 text config (hf_text_config's); the rotary of both
    layer kinds, the sliding layers and window, the attention scale. Refuses what agp does not compute."""
    act = cfg.get("hidden_activation")
    if act != GEMMA_ACTIVATION:
        fail(f"hidden_activation {json.dumps(act)} is not supported (agp's Gemma 3 MLP is GeGLU with "
             f"'{GEMMA_ACTIVATION}')")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            fail(f"'{key}' is {json.dumps(cfg[key])}: agp computes Gemma 3 without softcapping")
    if cfg.get("use_bidirectional_attention"):
        fail("'use_bidirectional_attention' is true: an embedding model, not a decoder agp generates with")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ({"full_attention", "sliding_attention"} & params.keys()):
        # transformers >= 5: one rope_parameters object per layer kind
        full, local = (params.get(k) or {} for k in ("full_attention", "sliding_attention"))
        if not isinstance(full, dict) or not isinstance(local, dict):
            fail(f"rope_parameters {json.dumps(params)[:160]}: each layer kind's must be an object")
        context = {k: cfg[k] for k in ("max_position_embeddings",) if k in cfg}   # dynamic's original

        def kind_fail(kind):                  # a problem of one layer kind's rotary names it
            return lambda problem: fail(problem.replace("rope_parameters", f"rope_parameters.{kind}", 1))

        theta, scaling = hf_rope({"rope_parameters": {"rope_theta": 1e6, **full}, **context},
                                 kind_fail("full_attention"))
        local_theta, local_scaling = hf_rope({"rope_parameters": {"rope_theta": 1e4, **local}, **context},
                                             kind_fail("sliding_attention"))
        if local_scaling:
            fail("rope_parameters: the sliding layers' rotary is scaled; agp computes Gemma 3's sliding "
                 "layers with plain RoPE")
    else:
        theta, scaling = hf_rope({**cfg, "rope_theta": cfg.get("rope_theta", 1e6)}, fail)
        local_theta = cfg.get("rope_local_base_freq", 1e4)
    kinds = cfg.get("layer_types")
    if kinds is None:
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            fail(f"'sliding_window_pattern' must be a positive integer, not {json.dumps(pattern)}")
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if not isinstance(kinds, list) or len(kinds) != num_layers or \
            not set(kinds) <= {"sliding_attention", "full_attention"}:
        fail(f"'layer_types' must list 'sliding_attention' or 'full_attention' for each of the "
             f"{num_layers} layers, not {json.dumps(kinds)[:120]}")
    sliding = tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")
    window = _window(fail, cfg.get("sliding_window"), "'sliding_window'", sliding)
    scalar = cfg.get("query_pre_attn_scalar")
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
        fail(f"'query_pre_attn_scalar' must be a positive number, not {json.dumps(scalar)}")
    return dict(rope_theta=theta, rope_scaling=scaling, **_fields(fail, window, sliding, local_theta,
                                                                   scalar ** -0.5))


def gguf_gemma_fields(m: dict, fail, c: dict) -> dict:
    """The Gemma 3 fields of a gemma3 GGUF, as llama.cpp reads them: every sixth layer global, the
    others sliding over `gemma3.attention.sliding_window` keys with rotary base 10000 unscaled, the
    attention scaled by head size ** -0.5 (hidden / heads for the 62-layer 27B, as Gemma's own code)."""
    window = m.get("gemma3.attention.sliding_window")
    if window is None:
        fail("the metadata lacks 'gemma3.attention.sliding_window' (a gemma3 model needs it)")
    n = c["num_layers"]
    sliding = tuple(i for i in range(n) if (i + 1) % 6)
    per_head = c["hidden_size"] // c["num_heads"] if n == 62 else c["head_dim"]
    window = _window(fail, window, "metadata 'gemma3.attention.sliding_window'", sliding)
    return _fields(fail, window, sliding, 10000.0, float(per_head) ** -0.5)


def _window(fail, window, where: str, sliding: tuple):
    """The sliding window in keys (0 where no layer slides); fail naming `where`, its key in the
    file read, unless it is a positive integer where some layer slides."""
    if not sliding:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        fail(f"{where} must be a positive integer, not {json.dumps(window)}")
    return window


def _fields(fail, window: int, sliding: tuple, local_theta, scale) -> dict:
    if isinstance(local_theta, bool) or not isinstance(local_theta, (int, float)) or not local_theta > 0:
        fail(f"'rope_local_base_freq' must be a positive number, not {json.dumps(local_theta)}")
    return dict(gemma=True, qk_norm=True, sliding_window=window,
                window_layers=sliding, rope_local_theta=float(local_theta),
                attn_scale=float(scale))
