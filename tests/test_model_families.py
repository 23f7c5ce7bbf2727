"""A user's own Hugging Face folder runs as transformers runs it, or is refused saying why.

Each test saves a tiny random-weight model with transformers (2 layers, hidden 64) beside the
tiny tokenizer, then compares agp's fp32 logits with transformers' on the same folder: rotary
settings in both config formats (transformers < 5: rope_theta + rope_scaling; 5:
rope_parameters), Llama 3's, yarn and dynamic NTK scaling (a GGUF's yarn keys too), a head size
that is not hidden / heads, Mistral's sliding window, bf16 weights. Config fields that change
what the model computes and that agp does not compute (biases, another activation, another
rotary kind) are errors at the model setting.
"""

import json

import pytest
import torch

from pipeline_dsl.engine.models import load_model
from pipeline_dsl.model_files import ModelFileProblem, check_model_path, context_length

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# the 48-token prompt runs past the original context of 32: both sides of the ramp count
YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
DYNAMIC_SCALING = {"rope_type": "dynamic", "factor": 2.0}
TOKENS = [5, 77, 130, 9, 260, 41, 3, 200, 17, 99, 150, 64, 12, 240, 8, 33] * 3     # 48 prompt tokens


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_gguf):
    _, tok = load_model(str(tiny_gguf), dtype="fp32")
    return tok


def save_folder(folder, tok, *, cls="LlamaConfig", legacy=None, dtype=torch.float32, seed=0, **fields):
    """A tiny random model saved by transformers; `legacy` rewrites config.json the way
    transformers < 5 writes it (rope_theta and rope_scaling at the top level)."""
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
    cfg.update(fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**cfg))
    with torch.no_grad():   # weights of unit scale: logits of a few units, decisive argmaxes
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.to(dtype).save_pretrained(folder)
    if legacy is not None:
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_parameters", None)
        config.update(legacy)
        (folder / "config.json").write_text(json.dumps(config))
    tok.tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": tok.chat_template}))
    return folder


def assert_same_logits(folder, ids=TOKENS):
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]                     # [T, V]
    model, _ = load_model(str(folder), dtype="fp32")
    got = model.forward_full(ids)                                     # [T, V]
    assert want.abs().max() > 1                                       # real logits, not near zero
    assert (got - want).abs().max().item() < 1e-4
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@pytest.mark.parametrize("fields, legacy", [
    (dict(rope_theta=100000.0), None),                                           # rope_parameters' theta
    (dict(rope_theta=100000.0), dict(rope_theta=100000.0, rope_scaling=None)),   # the same, 4.x's spelling
    (dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING), None),
    (dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
     dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), None),
    (dict(rope_scaling=YARN_SCALING), None),
    (dict(rope_theta=100000.0), dict(rope_theta=100000.0, rope_scaling={"type": "yarn", "factor": 4.0,   # Qwen2.5's
                                                                        "original_max_position_embeddings": 32})),
    (dict(rope_scaling={**YARN_SCALING, "beta_fast": 16, "beta_slow": 2, "truncate": False}), None),
    (dict(rope_scaling={**YARN_SCALING, "attention_factor": 1.5}), None),
    (dict(rope_scaling={**YARN_SCALING, "mscale": 1.0, "mscale_all_dim": 0.5}), None),
    # within max_position_embeddings (256) dynamic NTK rotates as plain RoPE does, in transformers too
    (dict(rope_scaling=DYNAMIC_SCALING), None),
    (dict(rope_scaling=DYNAMIC_SCALING), dict(rope_scaling={"type": "dynamic", "factor": 2.0})),
], ids=["theta", "theta-4.x", "llama3", "llama3-4.x", "linear", "yarn", "yarn-4.x", "yarn-betas", "yarn-attention",
        "yarn-mscale", "dynamic", "dynamic-4.x"])
def test_rotary_settings_of_either_config_format_give_transformers_logits(tmp_path, tiny_tokenizer, fields, legacy):
    assert_same_logits(save_folder(tmp_path, tiny_tokenizer, legacy=legacy, **fields))


def test_a_head_size_apart_from_hidden_over_heads_with_one_kv_head_and_bf16_weights(tmp_path, tiny_tokenizer):
    folder = save_folder(tmp_path, tiny_tokenizer, head_dim=32, num_key_value_heads=1, tie_word_embeddings=True,
                         dtype=torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([TOKENS])).logits[0]                  # [T, V]
    model, _ = load_model(str(folder), dtype="fp32")
    assert model.config.head_dim == 32 and model.config.group == 4
    assert (model.forward_full(TOKENS) - want).abs().max().item() < 1e-4


def test_mistral_sliding_window_bounds_the_context_where_full_attention_is_the_same(tmp_path, tiny_tokenizer):
    folder = save_folder(tmp_path, tiny_tokenizer, cls="MistralConfig", sliding_window=16)
    assert context_length(str(folder)) == 16
    model, _ = load_model(str(folder), dtype="fp32")
    assert model.config.max_position == 16
    assert_same_logits(folder, TOKENS[:16])


@pytest.mark.parametrize("cls, context", [
    ("LlamaConfig", 2048), ("Qwen2Config", 32768), ("Qwen3Config", 32768), ("Phi3Config", 4096),
    ("MistralConfig", 4096),         # max_position_embeddings 131072, bounded by its sliding_window 4096
])
def test_a_config_without_its_context_takes_its_model_type_s_transformers_default(tmp_path, tiny_tokenizer,
                                                                                   cls, context):
    folder = save_folder(tmp_path, tiny_tokenizer, cls=cls, pad_token_id=None)
    config = json.loads((folder / "config.json").read_text())
    for key in ("max_position_embeddings", "sliding_window"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(str(folder))
    window = getattr(theirs, "sliding_window", None) if getattr(theirs, "use_sliding_window", True) else None
    assert min(theirs.max_position_embeddings, window or theirs.max_position_embeddings) == context
    assert context_length(str(folder)) == context


@pytest.mark.parametrize("scaling, context", [
    ({"rope_type": "linear", "factor": 4.0}, 1024),                                   # 256 x 4
    (YARN_SCALING, 128),                                                              # the original 32 x 4
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 200}, 400),  # beyond the stated 256
    (LLAMA3_SCALING, 256),                                                            # stated as scaled
    ({"type": "dynamic", "factor": 2.0}, 512),                                        # 256 x 2, as vLLM's
])
def test_the_context_of_a_scaled_rotary_is_the_one_vllm_serves(tmp_path, tiny_tokenizer, scaling, context):
    folder = save_folder(tmp_path, tiny_tokenizer, legacy=dict(rope_scaling=scaling))
    assert context_length(str(folder)) == context
    model, _ = load_model(str(folder), dtype="fp32")
    assert model.config.max_position == context


@pytest.mark.parametrize("fields, words", [
    (dict(cls="MistralConfig", attention_bias=True), "'attention_bias' is true, but a mistral model has no"),
    (dict(mlp_bias=True), "'mlp_bias' is true"),
    (dict(hidden_act="gelu"), "hidden_act \"gelu\" is not supported"),
    (dict(rope_scaling={**YARN_SCALING, "attn_factor": 2.0}), "'attn_factor' 2.0 is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 0}),
     "rope_parameters 'factor' must be a positive number, not 0"),
    (dict(legacy=dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                    "original_max_position_embeddings": 32})),
     "rope_type 'longrope' is not supported"),
    (dict(legacy=dict(rope_scaling={"type": "dynamic"})), "rope_scaling 'factor' must be a positive number, not null"),
])
def test_a_config_field_agp_does_not_compute_is_refused_by_name(tmp_path, tiny_tokenizer, fields, words):
    save_folder(tmp_path, tiny_tokenizer, **fields)
    with pytest.raises(ModelFileProblem, match=words):
        check_model_path(tmp_path)


def test_bias_tensors_without_a_config_flag_are_refused(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    save_folder(tmp_path, tiny_tokenizer)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="'model.layers.0.self_attn.q_proj.bias' is a bias"):
        check_model_path(tmp_path)


@pytest.mark.parametrize("stated, refused", [(False, True), (None, False), (True, False)])
def test_an_untied_config_without_its_lm_head_is_refused_where_it_says_untied(tmp_path, tiny_tokenizer,
                                                                             stated, refused):
    """config.json saying tie_word_embeddings false over weights that hold no lm_head.weight is a
    checkpoint with a tensor missing (transformers would run it with a random output layer): it
    ran tied without a word. Not stated, or true: the embedding is the output layer."""
    from safetensors.torch import load_file, save_file

    save_folder(tmp_path, tiny_tokenizer)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    if stated is not None:
        config["tie_word_embeddings"] = stated
    (tmp_path / "config.json").write_text(json.dumps(config))
    if refused:
        with pytest.raises(ModelFileProblem, match="tie_word_embeddings false, but no weights file holds lm_head"):
            check_model_path(tmp_path)
    else:
        check_model_path(tmp_path)


def test_rope_parameters_win_over_rope_scaling_where_a_config_has_both():
    """transformers 5 writes rope_parameters, and reads it before a rope_scaling left beside it."""
    from pipeline_dsl.model_files.rope import hf_rope

    cfg = {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
           "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}
    assert hf_rope(cfg, pytest.fail) == (500000.0, (("rope_type", "linear"), ("factor", 4.0)))


def test_the_llama3_rotary_frequencies_follow_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pipeline_dsl.model_files.rope import hf_rope, rope_inv_freq

    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                      max_position_embeddings=131072, rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 8192})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")            # [head_dim/2]
    theta, scaling = hf_rope(config.to_dict(), pytest.fail)
    got = torch.tensor(rope_inv_freq(128, theta, scaling), dtype=torch.float64)
    assert torch.allclose(got, want.double(), rtol=1e-5)              # transformers works in float32
    plain = torch.tensor(rope_inv_freq(128, theta), dtype=torch.float64)
    assert not torch.allclose(got, plain, rtol=1e-3)                  # it does scale


def gguf_as_hf_folder(gguf, folder, tok, **config):
    """The weights of a tiny GGUF as a Hugging Face folder (transformers reads it as it is)."""
    from safetensors.torch import save_file

    from pipeline_dsl.engine.gguf_loader import load_gguf

    g = load_gguf(gguf)
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
             "up": "mlp.up_proj", "down": "mlp.down_proj"}
    hf = {"model.embed_tokens.weight": g.weights["embed"], "model.norm.weight": g.weights["norm"]}
    for i in range(g.config.num_layers):
        hf.update({f"model.layers.{i}.{theirs}.weight": g.weights[f"layers.{i}.{ours}"].contiguous()
                   for ours, theirs in parts.items()})
    save_file(hf, str(folder / "model.safetensors"))
    c = g.config
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "rms_norm_eps": c.rms_eps,
        "max_position_embeddings": c.max_position, "tie_word_embeddings": True, **config}))
    tok.tk.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("kind", ["rope_freqs", "linear"])
def test_a_gguf_rotary_scaling_gives_transformers_logits_of_the_same_model(tmp_path, tiny_tokenizer, kind):
    """A Llama 3.1 GGUF carries its scaling as a rope_freqs tensor (llama.cpp divides each
    frequency by it); an older one as llama.rope.scaling.type linear + factor."""
    from tiny_model import TINY, write_tiny_gguf

    from pipeline_dsl.model_files.rope import hf_rope, rope_inv_freq

    hd = TINY["hidden"] // TINY["heads"]
    if kind == "rope_freqs":
        config = dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
        theta, scaling = hf_rope(config, pytest.fail)
        factors = [a / b for a, b in zip(rope_inv_freq(hd, theta), rope_inv_freq(hd, theta, scaling))]
        gguf = write_tiny_gguf(tmp_path / "m.gguf", theta=500000.0, rope_freqs=factors)
    else:
        config = dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
        gguf = write_tiny_gguf(tmp_path / "m.gguf", rope_scaling=("linear", 4.0))
    folder = tmp_path / "hf"
    folder.mkdir()
    gguf_as_hf_folder(gguf, folder, tiny_tokenizer, **config)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([TOKENS])).logits[0]                  # [T, V]
    model, _ = load_model(str(gguf), dtype="fp32")
    assert (model.forward_full(TOKENS) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("keys", [{}, {"original_context_length": 128}], ids=["linear", "linear-original"])
def test_a_gguf_with_linear_rope_scaling_serves_its_context_length_as_llama_cpp_does(tmp_path, keys):
    """A GGUF's `{arch}.context_length` with `.rope.scaling.type` linear and a factor of 4 is the
    context it serves, not 4 times it: llama.cpp takes context_length as the trained context
    (n_ctx_train, its default context) whatever the scaling, the factor only dividing the rotary
    frequencies, and `.original_context_length` is yarn's alone; vLLM reading a GGUF takes
    context_length as max_position_embeddings with no rope_scaling. agp serve reports it as
    max_model_len and refuses a prompt + max_tokens one past it (the folder the file was converted
    from, max_position_embeddings times the factor, is vLLM's own rule for a config.json: above)."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve_model_arg import parse
    from tiny_model import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf", rope_scaling=("linear", 4.0), rope_metadata=keys)
    assert context_length(str(gguf)) == 512
    serving = build(parse([str(gguf), "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            model = client.get("/v1/models").json()["data"][0]
            assert model["max_model_len"] == 512, model
            ask = {"model": model["id"], "prompt": [5] * 500, "temperature": 0}
            r = client.post("/v1/completions", json={**ask, "max_tokens": 12, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text
            r = client.post("/v1/completions", json={**ask, "max_tokens": 13})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == ("prompt of 500 tokens + max_tokens 13 = 513 exceeds the model's "
                                                    "context of 512 tokens; shorten the prompt or lower max_tokens")
    finally:
        serving.runtime.close()


@pytest.mark.parametrize("keys, fields", [
    ({"original_context_length": 32}, {}),
    ({"original_context_length": 32, "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}, {"beta_fast": 16.0,
                                                                                       "beta_slow": 2.0}),
    ({"original_context_length": 32, "yarn_attn_factor": 1.5, "yarn_ext_factor": 1.0}, {"attention_factor": 1.5}),
], ids=["yarn", "yarn-betas", "yarn-attention"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_yarn_gives_the_logits_of_the_same_hf_folder(tmp_path, tiny_tokenizer, keys, fields, arch):
    """llama.cpp's converter writes a config.json's yarn as {arch}.rope.scaling.type yarn, .factor,
    .original_context_length and the yarn_* keys: the file runs as transformers runs the folder,
    48 tokens past the original context of 32, and serves the folder's context (32 x 4)."""
    from tiny_model import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, rope_scaling=("yarn", 4.0), rope_metadata=keys)
    assert context_length(str(gguf)) == 128
    folder = tmp_path / "hf"
    folder.mkdir()
    config = {"rope_scaling": {**YARN_SCALING, **fields}}
    if arch == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    gguf_as_hf_folder(gguf, folder, tiny_tokenizer, **config)
    if arch == "qwen2":                         # its q, k and v biases beside the weights
        from safetensors.torch import load_file, save_file

        from pipeline_dsl.engine.gguf_loader import load_gguf

        weights, g = load_file(str(folder / "model.safetensors")), load_gguf(gguf).weights
        for i in range(2):
            for part in "qkv":
                weights[f"model.layers.{i}.self_attn.{part}_proj.bias"] = g[f"layers.{i}.{part}_bias"]
        save_file(weights, str(folder / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([TOKENS])).logits[0]                  # [T, V]
    got = load_model(str(gguf), dtype="fp32")[0].forward_full(TOKENS)
    assert (got - want).abs().max().item() < 1e-4
    assert (load_model(str(folder), dtype="fp32")[0].forward_full(TOKENS) - got).abs().max().item() < 1e-4
    plain = write_tiny_gguf(tmp_path / "plain.gguf", arch=arch)
    assert (load_model(str(plain), dtype="fp32")[0].forward_full(TOKENS) - got).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind, keys, words", [
    ("longrope", {}, "metadata 'llama.rope.scaling.type' 'longrope' is not supported"),
    ("yarn", {"yarn_ext_factor": 0.5}, "metadata 'llama.rope.scaling.yarn_ext_factor' is 0.5"),
    ("yarn", {"yarn_log_multiplier": 0.1}, "metadata 'llama.rope.scaling.yarn_log_multiplier' is 0.1"),
    ("yarn", {"yarn_beta_fast": 0.0}, "metadata 'llama.rope.scaling.yarn_beta_fast' must be a positive number"),
])
def test_a_gguf_rotary_kind_agp_does_not_compute_is_refused(tmp_path, capsys, kind, keys, words):
    from tiny_model import write_tiny_gguf

    from pipeline_dsl import cli

    path = write_tiny_gguf(tmp_path / "m.gguf", rope_scaling=(kind, 4.0), rope_metadata=keys)
    with pytest.raises(ModelFileProblem, match=words):
        check_model_path(path)
    assert cli.main(["serve", str(path), "--port", "0"]) == 2      # refused at start, naming the key
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def hf_greedy(folder, prompt, n):
    """transformers' greedy tokens after `prompt`, decoded a token at a time with its cache."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids, cache, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            step = ref(ids, cache=cache, use_cache=True)
            cache, ids = step.cache, step.logits[:, -1:].argmax(-1)
            out.append(ids.item())
    return out


def test_dynamic_ntk_past_the_original_context_rotates_each_position_as_transformers_decodes_it(tmp_path,
                                                                                                tiny_tokenizer):
    """Past max_position_embeddings (32 here) transformers grows dynamic NTK's base with the
    sequence, recomputed each forward from its longest position: decoding a token at a time, the
    token at position p is rotated with the base of p + 1 tokens, as agp's tables rotate every
    position p (a prompt past the original context prefilled in one forward takes the base of its
    whole length in transformers, which would make a token's rotation depend on its batch, its
    prefill's chunks and a reused prefix: model_files/rope.py). The whole engine (paged KV cache,
    batched decode, the native CPU kernels) gives transformers' greedy tokens up to the context
    vLLM serves, 32 x 2."""
    folder = save_folder(tmp_path / "dynamic", tiny_tokenizer, max_position_embeddings=32,
                         rope_scaling=DYNAMIC_SCALING)
    assert context_length(str(folder)) == 64
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        first = ref(torch.tensor([TOKENS[:24]]), use_cache=True)
        want, cache = [first.logits[0]], first.cache
        for t in TOKENS[24:]:
            step = ref(torch.tensor([[t]]), cache=cache, use_cache=True)
            want, cache = want + [step.logits[0]], step.cache
    want = torch.cat(want)                                            # [48, V]
    got = load_model(str(folder), dtype="fp32")[0].forward_full(TOKENS)
    assert (got - want).abs().max().item() < 1e-4
    plain = save_folder(tmp_path / "plain", tiny_tokenizer, max_position_embeddings=64)   # the same weights
    unscaled = load_model(str(plain), dtype="fp32")[0].forward_full(TOKENS)
    assert (unscaled[:32] - got[:32]).abs().max().item() < 1e-4                 # within 32: plain RoPE
    assert (unscaled[32:] - got[32:]).abs().max().item() > 1e-2                 # past it: scaled
    prompts = [TOKENS[:20], TOKENS[5:32]]
    assert engine_greedy(folder, prompts, n=30) == [hf_greedy(folder, p, 30) for p in prompts]


def engine_greedy(folder, prompts, dtype="fp32", n=12):
    """Greedy token ids of each prompt through the whole engine (batched decode, paged KV)."""
    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model=str(folder), dtype=dtype, kv_budget_bytes=1 << 20, batch_timeout_s=0.0,
                                 block_size=8))
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True))
    got = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    return [got[str(i)] for i in range(len(prompts))]


def test_a_qwen2_folder_runs_with_its_qkv_biases_as_transformers_does(tmp_path, tiny_tokenizer):
    folder = save_folder(tmp_path, tiny_tokenizer, cls="Qwen2Config", tie_word_embeddings=True,
                         rope_theta=1000000.0)
    assert_same_logits(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompts = [TOKENS[:7], TOKENS[3:20], TOKENS[10:12]]
    for ids, got in zip(prompts, engine_greedy(folder, prompts)):
        with torch.no_grad():   # transformers' greedy choice after each of our tokens, in one forward
            want = ref(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
        assert got == want and len(got) == 12
    for dtype in ("bf16", "int8"):           # the other precisions run too (their kernels take no bias)
        assert all(len(g) == 12 for g in engine_greedy(folder, prompts, dtype))


@pytest.mark.parametrize("cls", ["LlamaConfig", "Qwen3Config"])
def test_a_folder_with_attention_bias_runs_its_q_k_v_and_o_biases_as_transformers_does(tmp_path, tiny_tokenizer,
                                                                                       cls):
    # transformers' LlamaAttention (and Qwen3's) gives o_proj a bias too where attention_bias is true
    folder = save_folder(tmp_path, tiny_tokenizer, cls=cls, attention_bias=True)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.o_proj.bias" in f.keys()
    assert_same_logits(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompts = [TOKENS[:7], TOKENS[3:20], TOKENS[10:12]]
    for ids, got in zip(prompts, engine_greedy(folder, prompts)):   # paged KV, batched decode
        with torch.no_grad():
            want = ref(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
        assert got == want and len(got) == 12
    for dtype in ("bf16", "int8"):           # the other precisions run too (their kernels take no bias)
        assert all(len(g) == 12 for g in engine_greedy(folder, prompts, dtype))


def test_an_attention_bias_folder_through_the_gpu_path_s_graphs_answers_as_eager(tmp_path, tiny_tokenizer):
    # the decode graphs and the piecewise graphs of mixed steps (captured with an eager stand-in for
    # torch.cuda graphs) add the output projection's bias as the eager forward does
    from test_gpu_path import RecordedGraphs, eager, run_engine, same_answers

    folder = save_folder(tmp_path, tiny_tokenizer, attention_bias=True)
    model, _ = load_model(str(folder), dtype="fp32")
    ref, _ = run_engine(eager(model, 64), 0)
    graphs = eager(model, 64)
    graphs.capture_graphs(max_batch=8, max_len=96, graph_factory=RecordedGraphs(), max_tokens=24)
    got, _ = run_engine(graphs, 0, executor=True)
    assert graphs.graphs.replays > 0 and graphs.graphs.pieces.replays > 0
    assert same_answers(got, ref)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_an_attention_bias_models_piecewise_graphs_give_the_eager_steps_logits_bit_for_bit(tmp_path, tiny_tokenizer,
                                                                                            dtype):
    # a mixed step's piecewise graphs add o_proj's bias as the eager step does, o(a) + bias first and
    # then the residual: (x + o(a)) + bias rounds otherwise, and in bf16 (a GPU's dtype) moved logits
    # by ~0.02. A step of exactly one token bucket: the same GEMM shapes, so the same bits
    from pipeline_dsl.engine.batch import StepBatch
    from pipeline_dsl.engine.model import SeqBatchItem
    from test_gpu_path import RecordedGraphs, eager

    folder = save_folder(tmp_path, tiny_tokenizer, attention_bias=True)
    model, _ = load_model(str(folder), dtype=dtype)
    runner = eager(model, 64)
    runner.capture_graphs(max_batch=4, max_len=64, graph_factory=RecordedGraphs(), max_tokens=16)
    items = [SeqBatchItem(TOKENS[:16], 0, [0, 1, 2, 3], True)]          # 16 rows: the first bucket
    want = runner.run(runner.prepare(StepBatch.from_items(items)), graphs=False)
    got = runner.run(runner.prepare(StepBatch.from_items(items)), graphs=True)
    assert runner.graphs.pieces.replays == 1
    assert torch.equal(got, want)


def test_a_qwen2_folder_without_its_biases_is_refused(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    save_folder(tmp_path, tiny_tokenizer, cls="Qwen2Config")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="missing tensors: model.layers.1.self_attn.k_proj.bias"):
        check_model_path(tmp_path)


def greedy_in_waves(path, waves, dtype="fp32", n=10, **config):
    """(greedy ids, cached prompt tokens) of each prompt through one engine, a wave of prompts
    after the one before has finished: a later wave's prompts that begin with an earlier one's
    read its full KV blocks from the prefix cache (blocks of 8; prefill in chunks of 8 tokens)."""
    from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(EngineConfig(model=str(path), dtype=dtype, kv_budget_bytes=1 << 20, batch_timeout_s=0.0,
                                 block_size=8, prefill_chunk=8, **config))
    out = []
    for wave in waves:
        got = {}
        for ids in wave:
            rid = str(len(out) + len(got))
            got[rid] = ([], 0)
            engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True))
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id] = (got[o.request_id][0] + o.new_token_ids, max(got[o.request_id][1],
                                                                                  o.cached_tokens))
        out += [got[rid] for rid in sorted(got, key=int)]
    return out


def assert_greedy_like_transformers(ref, path, waves, n=10):
    """The engine's greedy tokens of every prompt in `waves` are transformers' greedy choices
    (after each of our tokens, in one forward), and the later waves hit the prefix cache."""
    prompts = [ids for wave in waves for ids in wave]
    results = greedy_in_waves(path, waves, n=n)
    for ids, (got, _) in zip(prompts, results):
        with torch.no_grad():
            want = ref(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
        assert got == want and len(got) == n
    assert all(cached >= 8 for _, cached in results[len(waves[0]):])


QWEN3_WAVES = [[TOKENS[:30], TOKENS[5:12]], [TOKENS[:30] + [7, 99, 4], TOKENS[:17], TOKENS[:30] + [250]]]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_qwen3_folder_runs_with_its_per_head_qk_norms_as_transformers_does(tmp_path, tiny_tokenizer, tie):
    """Qwen3: an RMSNorm over each head of q and of k, after the projection and before RoPE, no
    biases, its own head_dim (Qwen3-0.6B: hidden 1024, 16 heads of 128): logits, and greedy
    tokens through the engine with chunked prefill and prefix-cache hits."""
    folder = save_folder(tmp_path, tiny_tokenizer, cls="Qwen3Config", tie_word_embeddings=tie, head_dim=32,
                         rope_theta=1000000.0)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == 32
    model, _ = load_model(str(folder), dtype="fp32")
    assert model.config.qk_norm and model.config.tie_embeddings == tie
    assert_same_logits(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert_greedy_like_transformers(ref, folder, QWEN3_WAVES)
    for dtype in ("bf16", "int8"):           # the other precisions run their norms too
        assert all(len(g) == 10 for g, _ in greedy_in_waves(folder, QWEN3_WAVES, dtype))


def test_a_qwen3_folder_without_its_norms_is_refused_and_another_model_with_them_too(tmp_path, tiny_tokenizer):
    """A qwen3 checkpoint missing a q_norm is broken; a llama config whose weights hold q/k norms
    would run without them: both are check errors naming the tensor."""
    from safetensors.torch import load_file, save_file

    save_folder(tmp_path, tiny_tokenizer, cls="Qwen3Config", head_dim=32)
    check_model_path(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ModelFileProblem, match="tensor 'model.layers.0.self_attn.[qk]_norm.weight' is an "
                                               "RMSNorm over each head of [qk], which only a qwen3 model has"):
        check_model_path(tmp_path)
    save_file({k: v for k, v in tensors.items() if "q_norm" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="tensor 'model.layers.0.self_attn.k_norm.weight' is an "
                                               "RMSNorm over each head of k, which only a qwen3 model has"):
        check_model_path(tmp_path)                  # k's norms alone: as refused
    (tmp_path / "config.json").write_text(json.dumps(config))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileProblem, match="missing tensors: model.layers.1.self_attn.k_norm.weight"):
        check_model_path(tmp_path)


def test_a_sharded_folder_reads_the_shards_its_index_names_and_no_other_safetensors(tmp_path, tiny_tokenizer):
    """Mistral's repositories ship consolidated.safetensors (their own layout) beside the
    sharded checkpoint; transformers reads the shards model.safetensors.index.json names."""
    from safetensors import safe_open

    folder = save_folder(tmp_path, tiny_tokenizer)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    (folder / "consolidated.safetensors").write_bytes(b"\x10" * 64)      # not read: not in the index
    check_model_path(folder)
    assert_same_logits(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere"}}))
    with pytest.raises(ModelFileProblem, match="names shard '../elsewhere', which is not a file in the folder"):
        check_model_path(folder)


def test_a_folder_transformers_saved_in_several_shards_runs_as_transformers_runs_it(tmp_path, tiny_tokenizer):
    folder = save_folder(tmp_path / "one", tiny_tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((folder / name).read_bytes())
    assert len(list((tmp_path / "sharded").glob("model-0000*-of-*.safetensors"))) > 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert_same_logits(tmp_path / "sharded")


def test_a_folder_of_pickled_weights_alone_is_told_why_they_are_not_read(tmp_path, tiny_tokenizer):
    folder = save_folder(tmp_path, tiny_tokenizer)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelFileProblem, match=r"no \*\.safetensors weights in the folder \(pytorch_model\.bin: "
                                               r"PyTorch's pickled checkpoint format, which agp does not read"):
        check_model_path(folder)


@pytest.mark.parametrize("cls", ["Qwen2Config", "Qwen3Config"])
def test_a_qwen_sliding_window_without_use_sliding_window_is_off_as_transformers_reads_it(tmp_path, tiny_tokenizer,
                                                                                          cls):
    folder = save_folder(tmp_path, tiny_tokenizer, cls=cls)
    config = json.loads((folder / "config.json").read_text())
    config.pop("use_sliding_window", None)
    config["sliding_window"] = 16
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(str(folder))
    assert not theirs.use_sliding_window and theirs.max_position_embeddings == 256
    assert context_length(str(folder)) == 256
    assert_same_logits(folder)                          # 48 tokens: past the window transformers leaves off
    config["use_sliding_window"] = True
    (folder / "config.json").write_text(json.dumps(config))
    assert context_length(str(folder)) == 16


def test_a_yarn_folder_is_served_with_vllm_s_max_model_len(tmp_path, tiny_tokenizer):
    from test_serve_model_arg import parse
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build

    folder = save_folder(tmp_path / "yarn", tiny_tokenizer, rope_scaling=YARN_SCALING)
    serving = build(parse([str(folder), "--served-model-name", "long", "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            card = client.get("/v1/models").json()["data"][0]
            assert (card["id"], card["max_model_len"]) == ("long", 128)
            r = client.post("/v1/completions", json={"model": "long", "prompt": [5] * 100, "max_tokens": 20,
                                                             "ignore_eos": True})     # sampled: EOS may come
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20, r.text
    finally:
        serving.runtime.close()


def test_fp16_weights_give_transformers_logits(tmp_path, tiny_tokenizer):
    assert_same_logits(save_folder(tmp_path, tiny_tokenizer, dtype=torch.float16, rope_scaling=YARN_SCALING))


@pytest.mark.parametrize("checkpoint, bf16, gemma, want", [
    ("float16", True, False, torch.float16),     # an fp16 checkpoint runs in fp16, as vLLM runs it
    ("bfloat16", True, False, torch.bfloat16),
    ("float32", True, False, torch.bfloat16),    # float32 downcast to the first the GPU supports
    ("", True, False, torch.bfloat16),           # a file that states none (a GGUF): as float32
    ("bfloat16", False, False, torch.float16),   # a GPU without bf16 (V100, T4): fp16
    ("float32", False, False, torch.float16),
    ("float16", True, True, torch.bfloat16),     # Gemma 3 overflows float16: never chosen for it
    ("float32", False, True, torch.float32),
])
def test_dtype_auto_on_cuda_follows_the_checkpoint_as_vllm_does(checkpoint, bf16, gemma, want):
    from pipeline_dsl.engine.model import auto_dtype

    got, why = auto_dtype("cuda", bf16, checkpoint, gemma)
    assert got == want and why


@pytest.mark.parametrize("bf16", [True, False])
def test_dtype_auto_on_a_cpu_keeps_agp_s_choice_and_says_the_checkpoint_s_is_followed_on_cuda(bf16):
    from pipeline_dsl.engine.model import auto_dtype

    got, why = auto_dtype("cpu", bf16, "float16")
    assert got == (torch.bfloat16 if bf16 else torch.float32)
    assert "float16 is followed on CUDA only" in why
    assert "CUDA" not in auto_dtype("cpu", bf16, "bfloat16" if bf16 else "float32")[1]


@pytest.mark.parametrize("drop", [False, True], ids=["torch_dtype", "weights"])
def test_a_folder_s_checkpoint_dtype_is_its_config_s_else_its_weights_and_auto_says_why(tmp_path, tiny_tokenizer,
                                                                                        drop):
    from pipeline_dsl.engine.model import has_bf16, resolve_dtype

    folder = save_folder(tmp_path, tiny_tokenizer, dtype=torch.float16)
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    if drop:                          # no dtype stated: the weights' own (F16), as vLLM reads them then
        config.pop("dtype", None)
        config.pop("torch_dtype", None)
        (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(str(folder), dtype="auto")
    assert model.config.checkpoint_dtype == "float16"
    cpu_bf16 = has_bf16(torch.device("cpu"))
    assert model.dtype == resolve_dtype("auto", "cpu", model.config)[1] == \
        (torch.bfloat16 if cpu_bf16 else torch.float32)
    assert "float16 is followed on CUDA only" in model.dtype_reason
    assert load_model(str(folder), dtype="fp32")[0].dtype_reason is None


def test_agp_serve_s_banner_says_what_dtype_auto_chose_and_why(tmp_path, tiny_tokenizer):
    import argparse

    from pipeline_dsl.commands.serve import banner
    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    folder = save_folder(tmp_path / "m", tiny_tokenizer, dtype=torch.float16)
    p = argparse.ArgumentParser()
    add_arguments(p)
    lines = {}
    for dtype in ("auto", "fp32"):
        args = p.parse_args([str(folder), "--threads", "1", "--dtype", dtype, "--max-model-len", "64"])
        serving = build(args)
        try:
            lines[dtype] = next(ln for ln in banner(serving, "http://127.0.0.1:8000/v1", args) if "engine" in ln)
        finally:
            serving.runtime.close()
    assert "compute, dtype auto: " in lines["auto"] and "float16 is followed on CUDA only" in lines["auto"]
    assert "dtype auto" not in lines["fp32"] and "float32 compute) on cpu" in lines["fp32"]
