"""Phi-3, Phi-3.5 and Phi-4-mini (model_type / architecture phi3) run as transformers' Phi3ForCausalLM.

Tiny random models (2 layers, hidden 64, 4 heads of 16) saved by transformers: q/k/v and
gate/up fused in one tensor each; a plain one (Phi-3-mini-4k: default rotary, a sliding window
that bounds the context), and one as Phi-4-mini (partial_rotary_factor 0.75: 12 of the 16 dims
rotate) with longrope (short and long factors, the attention factor). fp32 logits against
transformers, greedy tokens through the engine (chunked prefill, prefix-cache hits), from the
folder and from a GGUF of the same weights written as llama.cpp's converter writes it.
"""

import json
import math

import numpy as np
import pytest
import torch
from test_model_families import TOKENS, assert_greedy_like_transformers, greedy_in_waves, save_folder
from tiny_model import assert_same_logits, rewrite_gguf

from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.models import load_model
from pipeline_dsl.model_files import ModelFileProblem, check_model_path, context_length

transformers = pytest.importorskip("transformers")

SHORT = [1.0, 1.1, 1.3, 1.7, 2.2, 3.0]          # 6 factors: 12 rotary dims / 2
LONG = [1.0, 1.5, 2.5, 4.0, 7.0, 12.0]
# Phi-4-mini's rotary on a tiny head: 0.75 of 16 dims, longrope past 32 tokens, a context of 64
PHI4 = dict(partial_rotary_factor=0.75, max_position_embeddings=64, original_max_position_embeddings=32,
            rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG})
# prompts past the original context (transformers takes the long factors there), each wave's
# beginning with an earlier one's: the later ones read its KV blocks from the prefix cache
LONG_WAVES = [[TOKENS[:34], TOKENS[1:40]], [TOKENS[:34] + [7, 99, 4], TOKENS[:41], TOKENS[:34] + [250]]]
SHORT_WAVES = [[TOKENS[:18], TOKENS[5:12]], [TOKENS[:18] + [7, 99, 4], TOKENS[:17], TOKENS[:18] + [250]]]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_gguf):
    _, tok = load_model(str(tiny_gguf), dtype="fp32")
    return tok


def phi3_folder(folder, tok, **fields):
    return save_folder(folder, tok, cls="Phi3Config", pad_token_id=None, **fields)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def assert_logits(folder, ids, path=None):
    """agp's fp32 logits of `ids` (from `path`, else the folder) are transformers' on the folder."""
    model, _ = load_model(str(path or folder), dtype="fp32")
    assert_same_logits(reference(folder), model, ids)
    return model


def test_a_plain_phi3_folder_runs_as_transformers_runs_it(tmp_path, tiny_tokenizer):
    """Phi-3-mini-4k's shape: fused qkv_proj and gate_up_proj, the whole head rotated, and its
    sliding window (2047 of 4096) bounding the context, where full attention is the same."""
    folder = phi3_folder(tmp_path, tiny_tokenizer, sliding_window=40)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["sliding_window"] == 40
    assert context_length(str(folder)) == 40
    model = assert_logits(folder, TOKENS[:40])
    assert model.config.fused and model.config.rope_scaling == ()
    assert_greedy_like_transformers(reference(folder), folder, SHORT_WAVES)
    for dtype in ("bf16", "int8"):
        assert all(len(g) == 10 for g, _ in greedy_in_waves(folder, SHORT_WAVES, dtype))


def test_a_partial_rotary_longrope_phi3_folder_runs_as_transformers_runs_it(tmp_path, tiny_tokenizer):
    """Phi-4-mini's shape: 12 of each head's 16 dims rotate, longrope's long factors (the context,
    64, is past the original 32) and attention factor sqrt(1 + ln 2 / ln 32); logits and greedy
    tokens of prompts past 32 tokens, where transformers takes the long factors too."""
    folder = phi3_folder(tmp_path, tiny_tokenizer, tie_word_embeddings=True, **PHI4)
    model = assert_logits(folder, TOKENS)
    scaling = dict(model.config.rope_scaling)
    assert scaling["rotary_dims"] == 12 and scaling["long"] and scaling["factors"] == tuple(LONG)
    assert scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(32)))
    assert_greedy_like_transformers(reference(folder), folder, LONG_WAVES)
    for dtype in ("bf16", "int8"):
        assert all(len(g) == 10 for g, _ in greedy_in_waves(folder, LONG_WAVES, dtype))


def test_a_longrope_context_within_the_original_takes_the_short_factors(tmp_path, tiny_tokenizer):
    """A context no longer than original_max_position_embeddings: the short factors, as
    transformers takes them for every sequence that fits it (an explicit attention_factor)."""
    fields = dict(PHI4, max_position_embeddings=32,
                  rope_scaling={**PHI4["rope_scaling"], "attention_factor": 1.25})
    folder = phi3_folder(tmp_path, tiny_tokenizer, **fields)
    model = assert_logits(folder, TOKENS[:32])
    scaling = dict(model.config.rope_scaling)
    assert not scaling["long"] and scaling["factors"] == tuple(SHORT) and scaling["attention_factor"] == 1.25
    assert_greedy_like_transformers(reference(folder), folder, SHORT_WAVES)


@pytest.mark.parametrize("drop, context, long", [
    ("max_position_embeddings", 4096, True),            # Phi3Config's 4096: factor 4096 / 32, long factors
    ("original_max_position_embeddings", 64, False),    # Phi3Config's 4096 (not the rope dict's 32): short
])
def test_a_longrope_phi3_config_without_a_context_takes_phi3config_s_default(tmp_path, tiny_tokenizer, drop,
                                                                            context, long):
    """transformers fills in 4096 for a max_position_embeddings or original_max_position_embeddings
    that config.json leaves out (the rope dict's original_max_position_embeddings is not read):
    the context, the factors and the attention factor follow, so do the logits."""
    folder = phi3_folder(tmp_path, tiny_tokenizer, **PHI4)
    config = json.loads((folder / "config.json").read_text())
    del config[drop]
    config["rope_parameters"]["original_max_position_embeddings"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    assert context_length(str(folder)) == context
    model = assert_logits(folder, TOKENS)
    assert dict(model.config.rope_scaling)["long"] is long


def test_the_older_spelling_of_a_phi3_config_reads_the_same(tmp_path, tiny_tokenizer):
    """transformers < 5 wrote rope_theta and rope_scaling at the top (Phi-3.5's type "longrope",
    Phi-3-mini-128k's older "su"), partial_rotary_factor beside them."""
    folder = phi3_folder(tmp_path, tiny_tokenizer, **PHI4)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, partial_rotary_factor=0.75,
                  rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG})
    (folder / "config.json").write_text(json.dumps(config))
    assert_logits(folder, TOKENS)


@pytest.mark.parametrize("change, words", [
    (lambda c: c["rope_parameters"].update(short_factor=SHORT[:5]),
     "'short_factor' must be a list of 6 positive numbers"),
    (lambda c: c["rope_parameters"].update(rope_type="dynamic", factor=2.0), "rope_type 'dynamic' is not"),
    (lambda c: c["rope_parameters"].update(partial_rotary_factor=1.5), "partial_rotary_factor must be a number in"),
    (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.1), "the rotary needs an even number"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act \"gelu\" is not supported"),
    (lambda c: c["rope_parameters"].update(factor="2"),
     "rope_parameters 'factor' must be a positive number, not \"2\""),
    (lambda c: c["rope_parameters"].update(factor=0), "rope_parameters 'factor' must be a positive number, not 0"),
    (lambda c: c.update(original_max_position_embeddings=1),
     "'original_max_position_embeddings' is 1: longrope's attention factor"),
])
def test_a_phi3_config_agp_does_not_compute_is_refused_by_name(tmp_path, tiny_tokenizer, change, words):
    folder = phi3_folder(tmp_path, tiny_tokenizer, **PHI4)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileProblem, match=words):
        check_model_path(folder)


def test_partial_rotary_and_longrope_outside_phi3_stay_refused(tmp_path, tiny_tokenizer):
    save_folder(tmp_path, tiny_tokenizer, partial_rotary_factor=0.5)
    with pytest.raises(ModelFileProblem, match="partial_rotary_factor 0.5 is not supported"):
        check_model_path(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("partial_rotary_factor", None)
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                 "long_factor": [1.0] * 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileProblem, match="rope_type 'longrope' is not supported"):
        check_model_path(tmp_path)


def test_fused_tensors_are_phi3_s_alone_and_a_phi3_needs_its_own(tmp_path, tiny_tokenizer):
    """A llama config over Phi-3's fused weights would run without them; a phi3 checkpoint
    missing its gate_up_proj is broken: both are check errors naming the tensor."""
    from safetensors.torch import load_file, save_file

    folder = phi3_folder(tmp_path, tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelFileProblem, match="tensor 'model.layers.0.(self_attn.qkv|mlp.gate_up)_proj.weight' "
                                               "holds (q, k and v|gate and up) in one, which only a phi3 model has"):
        check_model_path(folder)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.gate_up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="missing tensors: model.layers.1.mlp.gate_up_proj.weight"):
        check_model_path(folder)


# -- GGUF ---------------------------------------------------------------------------------------

def gguf_of_folder(folder, path, *, rope_dims=None, longrope=False, qtype="F32", window=None):
    """The folder's phi3 model as llama.cpp's converter writes it: phi3.* keys, blk.N.attn_qkv,
    blk.N.ffn_up holding gate and up, no Q/K permutation (phi3's rotary is NeoX's halves),
    phi3.rope.dimension_count for a partial rotary, rope_factors_short/long tensors with
    phi3.rope.scaling.attn_factor and original_context_length for longrope; the tiny vocabulary."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from safetensors.torch import load_file
    from tiny_model import CHAT_TEMPLATE, tiny_vocab

    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.float().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}
    tokens, types, merges = tiny_vocab()
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    w = GGUFWriter(str(path), "phi3")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims or H // nh)
    if window is not None:
        w.add_sliding_window(window)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    if longrope:
        scaling = cfg["rope_parameters"]
        original = cfg["original_max_position_embeddings"]
        w.add_float32("phi3.rope.scaling.attn_factor",
                      math.sqrt(1 + math.log(cfg["max_position_embeddings"] / original) / math.log(original)))
        w.add_uint32("phi3.rope.scaling.original_context_length", original)
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
    qt = GGMLQuantizationType[qtype]

    def mat(name, a):
        w.add_tensor(name, a if qt == GGMLQuantizationType.F32 else quants.quantize(a, qt),
                     raw_dtype=None if qt == GGMLQuantizationType.F32 else qt)

    mat("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    if "lm_head.weight" in t:
        mat("output.weight", t["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        mat(f"blk.{i}.attn_qkv.weight", t[p + "self_attn.qkv_proj.weight"])
        mat(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        mat(f"blk.{i}.ffn_up.weight", t[p + "mlp.gate_up_proj.weight"])
        mat(f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_phi3_gguf_runs_as_transformers_reads_the_same_file(tmp_path, tiny_tokenizer):
    """A plain phi3 GGUF read by transformers itself (gguf_file=): the same logits, and greedy
    tokens through the engine with chunked prefill and prefix-cache hits."""
    folder = phi3_folder(tmp_path / "hf", tiny_tokenizer)
    path = gguf_of_folder(folder, tmp_path / "phi3.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ids = TOKENS[:40]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]                                     # [T, V]
    model, tok = load_model(str(path), dtype="fp32")
    assert model.config.fused
    assert (model.forward_full(ids) - want).abs().max().item() < 1e-4
    assert_greedy_like_transformers(ref, path, SHORT_WAVES)


def test_a_partial_rotary_longrope_phi3_gguf_runs_as_its_folder_does_in_transformers(tmp_path, tiny_tokenizer):
    """phi3.rope.dimension_count 12 of 16 and the rope_factors_long tensor (the context, 64, past
    phi3.rope.scaling.original_context_length 32), F32 and Q4_0 (its 4-bit blocks split and
    reordered with the float copy): transformers' logits and greedy tokens on the folder."""
    folder = phi3_folder(tmp_path / "hf", tiny_tokenizer, **PHI4)
    path = gguf_of_folder(folder, tmp_path / "phi4.gguf", rope_dims=12, longrope=True)
    model = assert_logits(folder, TOKENS, path)
    scaling = dict(model.config.rope_scaling)
    assert scaling["rotary_dims"] == 12 and scaling["factors"] == tuple(LONG)
    assert_greedy_like_transformers(reference(folder), path, LONG_WAVES)
    from tiny_model import write_tiny_gguf                # a context within the original: the short ones
    short = load_gguf(write_tiny_gguf(tmp_path / "short.gguf", arch="phi3", context=32, rope_dims=12,
                                      longrope=(SHORT, LONG, 32, 1.0)))
    assert dict(short.config.rope_scaling)["factors"] == pytest.approx(SHORT)    # float32 in the file
    q4 = load_gguf(gguf_of_folder(folder, tmp_path / "phi4-q4.gguf", rope_dims=12, longrope=True, qtype="Q4_0"))
    for part in ("q", "k", "v", "gate", "up"):       # the blocks the int4 kernels run are the float rows
        name = f"layers.1.{part}"
        assert torch.equal(q4.weights.int4[name].dequantized(), q4.weights[name])
    dense = load_gguf(path).weights
    assert (q4.weights["layers.1.q"] - dense["layers.1.q"]).abs().max() < 0.2    # the same rows, in 4 bits


def test_a_phi3_gguf_sliding_window_bounds_the_context(tmp_path, tiny_tokenizer):
    """phi3.attention.sliding_window as config.json's sliding_window; llama.cpp's converter writes
    0 where the config has none (Phi-4-mini)."""
    folder = phi3_folder(tmp_path / "hf", tiny_tokenizer, sliding_window=40)
    path = gguf_of_folder(folder, tmp_path / "phi3.gguf", window=40)
    assert context_length(str(path)) == 40
    assert_logits(folder, TOKENS[:40], path)
    none = gguf_of_folder(folder, tmp_path / "phi4.gguf", window=0)      # Phi-4-mini's: no window
    assert context_length(str(none)) == 256


def test_a_phi3_gguf_ends_a_turn_at_its_end_token(tmp_path, tiny_tokenizer):
    """Phi-3 files name <|endoftext|> their eos; each chat turn ends with <|end|> (a control
    token of the vocabulary), as the model's generation_config.json and llama.cpp end on both."""
    from tiny_model import write_tiny_gguf

    llama = write_tiny_gguf(tmp_path / "llama.gguf", control_tokens=("<|end|>",))
    phi = write_tiny_gguf(tmp_path / "phi3.gguf", control_tokens=("<|end|>",), arch="phi3")
    _, plain = load_model(str(llama), dtype="fp32")
    _, tok = load_model(str(phi), dtype="fp32")
    end = tok.token_to_id("<|end|>")
    assert end is not None and end not in plain.eos_token_ids    # another model's <|end|> is its own business
    assert {end, tok.token_to_id("<|endoftext|>")} <= tok.eos_token_ids


def linear_scaling(meta):
    from gguf import GGUFValueType

    meta["phi3.rope.scaling.type"] = ("linear", GGUFValueType.STRING, None)
    meta["phi3.rope.scaling.factor"] = (2.0, GGUFValueType.FLOAT32, None)


def original_one_without_attn_factor(meta):
    meta["phi3.rope.scaling.original_context_length"] = (1,) + meta["phi3.rope.scaling.original_context_length"][1:]
    del meta["phi3.rope.scaling.attn_factor"]      # computed from it then: ln 1 = 0


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update({"phi3.rope.dimension_count": (7,) + m["phi3.rope.dimension_count"][1:]}),
     "'phi3.rope.dimension_count' is 7: the rotary needs"),
    (lambda m: m.pop("phi3.rope.scaling.original_context_length") and None,
     "lacks 'phi3.rope.scaling.original_context_length'"),
    (lambda m: linear_scaling(m), "a phi3 file's rotary is scaled by longrope's rope_factors_short/long alone"),
    (lambda m: m.update({"phi3.rope.scaling.original_context_length":
                         (0,) + m["phi3.rope.scaling.original_context_length"][1:]}),
     "'phi3.rope.scaling.original_context_length' is 0: it must be a positive integer"),
    (lambda m: original_one_without_attn_factor(m),
     "'phi3.rope.scaling.original_context_length' is 1: longrope's attention factor .* needs it to be at least 2, "
     "or metadata 'phi3.rope.scaling.attn_factor' given"),
])
def test_a_phi3_gguf_rotary_agp_cannot_run_is_refused_by_name(tmp_path, tiny_tokenizer, change, words):

    folder = phi3_folder(tmp_path / "hf", tiny_tokenizer, **PHI4)
    path = gguf_of_folder(folder, tmp_path / "phi4.gguf", rope_dims=12, longrope=True)
    bad = rewrite_gguf(path, tmp_path / "bad.gguf", change)
    with pytest.raises(ModelFileProblem, match=words):
        check_model_path(bad)
    short_only = rewrite_gguf(path, tmp_path / "one.gguf", drop=("rope_factors_long.weight",))
    with pytest.raises(ModelFileProblem, match="'rope_factors_short.weight' is there without "
                                               "'rope_factors_long.weight'"):
        check_model_path(short_only)


def with_tensors(src, dst, tensors):
    """A copy of GGUF `src` at `dst` with `tensors` (name -> numpy array) in place of its own
    of those names, or beside them."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            kind = f.types[0]
            w.add_key_value(f.name, f.contents(), kind, sub_type=f.types[-1] if kind == GGUFValueType.ARRAY else None)
    for t in (t for t in r.tensors if t.name not in tensors):
        w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_longrope_factor_tensors_of_a_type_agp_cannot_read_are_refused_by_name(tmp_path):
    """Integer factors (I32: gguf has no dequantisation of them) are a check error, as they are
    at load, not a crash of the loader."""
    from tiny_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "phi3.gguf", arch="phi3", context=64, rope_dims=12,
                           longrope=(SHORT, LONG, 32, 1.2))
    assert dict(load_gguf(path).config.rope_scaling)["factors"] == pytest.approx(LONG)
    ints = with_tensors(path, tmp_path / "i32.gguf", {"rope_factors_short.weight": np.arange(1, 7, dtype=np.int32),
                                                      "rope_factors_long.weight": np.arange(1, 7, dtype=np.int32)})
    for read in (check_model_path, load_gguf):
        with pytest.raises(ModelFileProblem, match=r"tensor 'rope_factors_short.weight' has shape \[6\] and type I32; "
                                                   r"the rotary factors need \[6\] numbers"):
            read(ints)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_longrope_factors_or_attention_factor_outside_phi3_are_refused_by_name(tmp_path, arch):
    """agp computes longrope for a phi3 alone: another architecture's file carrying its factor
    tensors or an attention factor would run plain RoPE without them (one of 1 scales nothing)."""
    from gguf import GGUFValueType
    from tiny_model import write_tiny_gguf

    factors = write_tiny_gguf(tmp_path / "factors.gguf", arch=arch, longrope=([1.0] * 8, [2.0] * 8, 32, 1.0))
    with pytest.raises(ModelFileProblem, match=f"tensor 'rope_factors_short.weight' holds longrope's rotary "
                                               f"factors, which agp computes for a phi3 model alone: this {arch} "
                                               f"model would run without them"):
        check_model_path(factors)
    plain = write_tiny_gguf(tmp_path / "plain.gguf", arch=arch)

    def attn(value):
        return lambda m: m.update({f"{arch}.rope.scaling.attn_factor": (value, GGUFValueType.FLOAT32, None)})

    check_model_path(rewrite_gguf(plain, tmp_path / "one.gguf", attn(1.0)))
    with pytest.raises(ModelFileProblem, match=f"metadata '{arch}.rope.scaling.attn_factor' is 1.25: agp scales "
                                               f"cos and sin by an attention factor for a phi3 model's longrope alone"):
        check_model_path(rewrite_gguf(plain, tmp_path / "attn.gguf", attn(1.25)))


def test_a_separate_projection_beside_phi3_s_fused_ones_is_refused_by_name(tmp_path, tiny_tokenizer):
    """A phi3 file's q, k, v and gate, up are its fused tensors: another blk.N.ffn_gate (or a
    folder's self_attn.q_proj) would be read, then overwritten by the split, so it is refused."""
    from safetensors.torch import load_file, save_file
    from tiny_model import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "phi3.gguf", arch="phi3")
    gate = load_gguf(path).weights["layers.0.gate"].numpy()
    extra = with_tensors(path, tmp_path / "gate.gguf", {"blk.0.ffn_gate.weight": 2 * gate})
    with pytest.raises(ModelFileProblem, match="tensor 'blk.0.ffn_gate.weight' is a projection of gate alone, but "
                                               "a phi3 model holds gate and up in one tensor"):
        check_model_path(extra)
    folder = phi3_folder(tmp_path / "hf", tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][:64].clone()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="tensor 'model.layers.1.self_attn.q_proj.weight' is a projection of q "
                                               "alone, but a phi3 model holds q, k and v in one tensor"):
        check_model_path(folder)


# Phi-3-mini-4k-instruct's and Phi-3.5-mini-instruct's template (Phi-4-mini's writes no newlines)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def test_a_phi3_folder_chats_in_its_template_and_ends_its_turn_at_end(tmp_path, tiny_tokenizer):
    """<|user|>…<|end|><|assistant|> as transformers renders and tokenizes it, and the turn ends
    at <|end|>, which generation_config.json's eos_token_id lists beside <|endoftext|>."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from pipeline_dsl.engine.tokenizer import Tokenizer

    folder = phi3_folder(tmp_path, tiny_tokenizer)
    tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")])
    tk.save(str(folder / "tokenizer.json"))
    end, eot = tk.token_to_id("<|end|>"), tk.token_to_id("<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "chat_template": PHI3_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, end]}))
    ours = Tokenizer.from_hf_folder(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"},
            {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "Don't stop"}]
    text = ours.apply_chat_template(chat)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|user|>\nDon't stop<|end|>\n<|assistant|>\n")
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert {end, eot} <= ours.eos_token_ids
