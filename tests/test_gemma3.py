"""Gemma 3's text models run as transformers runs them, from a Hugging Face folder and from a GGUF.

Tiny random models (hidden 64): a gemma3_text folder saved by transformers (config in its 5.x form
and in 4.x's: rope_local_base_freq, sliding_window_pattern), a multimodal gemma3 folder whose
text_config is that model, and a gemma3 GGUF as llama.cpp's converter writes one (norms stored
as 1 + w, gemma3.attention.sliding_window, every sixth layer global). The sliding window is a few
tokens, and the prompts are longer: a model that attended to every key would answer otherwise.
transformers' fp32 logits and greedy tokens are the reference, the engine's through chunked
prefill and prefix-cache hits; the paths that compute llama's layers only (native CPU kernels,
flex attention, CUDA graphs) hand a Gemma model to the eager layers.
"""

import json

import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine.models import load_model
from pipeline_dsl.model_files import ModelFileProblem, check_model_path

transformers = pytest.importorskip("transformers")

from test_model_families import TOKENS, assert_greedy_like_transformers, greedy_in_waves  # noqa: E402
from tiny_model import assert_same_logits  # noqa: E402

# prompts of 30+ tokens against a window of 8: the sliding layers see a fraction of them
WAVES = [[TOKENS[:30], TOKENS[5:12]], [TOKENS[:30] + [7, 99, 4], TOKENS[:17], TOKENS[:30] + [250]]]
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_gguf):
    _, tok = load_model(str(tiny_gguf), dtype="fp32")
    return tok


def save_gemma(folder, tok, *, legacy=None, seed=0, **fields):
    """A tiny random Gemma3ForCausalLM saved by transformers: 3 layers (sliding, full, sliding), a
    window of 8, heads of 32 scaled by query_pre_attn_scalar 24 (not the head size), the full
    layers' rotary linearly scaled. `legacy`: config.json rewritten as transformers 4.x wrote it."""
    cfg = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
               sliding_window=8, layer_types=LAYER_TYPES, query_pre_attn_scalar=24, rope_theta=1e6,
               rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    cfg.update(fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(**cfg))
    with torch.no_grad():   # norms of weight ~0 (Gemma computes x * (1 + w)), matrices of unit scale
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if legacy is not None:
        for key in ("rope_parameters", "layer_types"):
            config.pop(key, None)
        config.update(legacy)
        (folder / "config.json").write_text(json.dumps(config))
    tok.tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# the 4.x spelling of the same model: rope_theta + rope_scaling (the full layers'), the sliding layers'
# base apart, and a pattern in place of layer_types (every 2nd layer full: 0 and 2 sliding, 1 full)
LEGACY = dict(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=10000.0,
              sliding_window_pattern=2)


@pytest.mark.parametrize("legacy", [None, LEGACY], ids=["5.x", "4.x"])
def test_a_gemma3_folder_gives_transformers_logits_and_greedy_tokens(tmp_path, tiny_tokenizer, legacy):
    """Scaled embeddings, x * (1 + w) norms, the attention's and the MLP's outputs normed before
    the residual, GeGLU, q/k norms, query_pre_attn_scalar, and the sliding layers' window and rotary:
    logits, and greedy tokens through the engine with chunked prefill and prefix-cache hits."""
    folder = save_gemma(tmp_path, tiny_tokenizer, legacy=legacy)
    model, _ = load_model(str(folder), dtype="fp32")
    c = model.config
    assert c.gemma and c.window_layers == (0, 2) and c.sliding_window == 8 and c.rope_local_theta == 10000.0
    assert c.rope_scaling == (("rope_type", "linear"), ("factor", 4.0)) and c.attn_scale == 24 ** -0.5
    ref = reference(folder)
    assert_same_logits(ref, model, TOKENS)
    assert_greedy_like_transformers(ref, folder, WAVES, n=12)
    for dtype in ("bf16", "int8"):           # the other precisions run the same layers
        assert all(len(g) == 10 for g, _ in greedy_in_waves(folder, WAVES, dtype))


def test_the_sliding_window_changes_the_answer_past_it(tmp_path, tiny_tokenizer):
    """The same weights with a window wider than the prompt give other logits from the ninth
    token on, and the same before it: the window is what the sliding layers compute."""
    narrow, _ = load_model(str(save_gemma(tmp_path / "a", tiny_tokenizer)), dtype="fp32")
    wide_folder = save_gemma(tmp_path / "b", tiny_tokenizer, sliding_window=1000)
    wide, _ = load_model(str(wide_folder), dtype="fp32")
    assert_same_logits(reference(wide_folder), wide, TOKENS)
    a, b = narrow.forward_full(TOKENS), wide.forward_full(TOKENS)
    assert (a[:8] - b[:8]).abs().max() < 1e-5 and (a[8:] - b[8:]).abs().max() > 0.1


def test_a_multimodal_gemma3_folder_runs_its_text_model(tmp_path, tiny_tokenizer):
    """A gemma3 config (Gemma 3 4B and up) holds the language model in text_config and its weights
    under language_model.model.* (transformers 4) or model.language_model.* (5); the vision
    tower's are not the text model's."""
    from safetensors.torch import load_file, save_file

    text = save_gemma(tmp_path / "text", tiny_tokenizer)
    ref = reference(text)
    config = json.loads((text / "config.json").read_text())
    tensors = load_file(str(text / "model.safetensors"))
    for prefix in ("language_model.model.", "model.language_model."):
        folder = tmp_path / prefix.replace(".", "_")
        folder.mkdir()
        renamed = {prefix + name[len("model."):]: t for name, t in tensors.items()}
        renamed["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
        renamed["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": config,
                                                        "vision_config": {"model_type": "siglip_vision_model"}}))
        (folder / "tokenizer.json").write_text((text / "tokenizer.json").read_text())
        check_model_path(folder)
        model, _ = load_model(str(folder), dtype="fp32")
        assert_same_logits(ref, model, TOKENS)


def test_a_gemma3_text_config_that_states_only_its_sizes_takes_transformers_defaults(tmp_path):
    """Gemma 3 4B's config.json: a gemma3 config whose text_config names only what differs from
    Gemma3TextConfig's defaults (heads, vocabulary, head size, rotary bases, the layer pattern are
    transformers' own)."""
    from pipeline_dsl.model_files import hf_config

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    c, want = hf_config(tmp_path), transformers.Gemma3TextConfig(**text)
    assert (c["vocab_size"], c["num_heads"], c["num_kv_heads"], c["head_dim"], c["max_position"], c["rms_eps"]) == \
        (want.vocab_size, want.num_attention_heads, want.num_key_value_heads, want.head_dim,
         want.max_position_embeddings, want.rms_norm_eps)
    params = want.rope_parameters
    assert c["rope_theta"] == params["full_attention"]["rope_theta"] and c["rope_scaling"] == (
        ("rope_type", "linear"), ("factor", 8.0))
    assert c["rope_local_theta"] == params["sliding_attention"]["rope_theta"]
    assert c["window_layers"] == tuple(i for i, k in enumerate(want.layer_types) if k == "sliding_attention")
    assert c["sliding_window"] == 1024 and c["attn_scale"] == want.query_pre_attn_scalar ** -0.5


@pytest.mark.parametrize("change, words", [
    (dict(final_logit_softcapping=30.0), "'final_logit_softcapping' is 30.0: agp computes Gemma 3 without"),
    (dict(attn_logit_softcapping=50.0), "'attn_logit_softcapping' is 50.0"),
    (dict(hidden_activation="relu"), "hidden_activation \"relu\" is not supported"),
    (dict(use_bidirectional_attention=True), "'use_bidirectional_attention' is true: an embedding model"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "the sliding layers' rotary is scaled"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "'layer_types' must list"),
    (dict(sliding_window=None), "'sliding_window' must be a positive integer, not null"),
], ids=["final-softcap", "attn-softcap", "activation", "bidirectional", "local-scaling", "layer-types", "window"])
def test_a_gemma3_config_agp_does_not_compute_is_refused_by_name(tmp_path, tiny_tokenizer, change, words):
    folder = save_gemma(tmp_path, tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileProblem, match=words.replace("(", r"\(")):
        check_model_path(folder)


def test_a_gemma3_dynamic_rotary_without_max_position_embeddings_names_the_missing_key_and_the_layer_kind():
    """Dynamic NTK scales past max_position_embeddings: a Gemma 3 text config without it (not null:
    missing) is refused naming that key as missing, and the layer kind whose rotary is dynamic."""
    from pipeline_dsl.model_files.gemma import hf_gemma_fields

    def fail(problem):
        raise ValueError(problem)

    cfg = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4,
           "rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0},
                               "sliding_attention": {"rope_type": "default"}}}
    with pytest.raises(ValueError) as e:
        hf_gemma_fields(cfg, fail, 6)
    assert str(e.value) == ("rope_parameters.full_attention: rope_type 'dynamic' scales past "
                            "max_position_embeddings, which is missing")
    got = hf_gemma_fields({**cfg, "max_position_embeddings": 64}, fail, 6)
    assert dict(got["rope_scaling"]) == {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64.0}


def test_a_gemma3_folder_missing_a_post_norm_is_refused_naming_it(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    folder = save_gemma(tmp_path, tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileProblem, match="missing tensors: model.layers.1.post_feedforward_layernorm.weight"):
        check_model_path(folder)


# -- GGUF ---------------------------------------------------------------------------------------

# Gemma 3's chat template (its instruction-tuned models'): a system message joins the first user
# turn, turns alternate <start_of_turn>user / <start_of_turn>model, each closed by <end_of_turn>
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"""

@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    """Gemma 3 as llama.cpp's converter writes it: 6 layers (0-4 sliding over 5 keys, 5 global),
    heads of 256 (transformers reads no query_pre_attn_scalar from a GGUF and takes 256; llama.cpp
    scales by the head size: the same here), a SentencePiece vocabulary with <end_of_turn>."""
    from tiny_model import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gemma3") / "gemma3.gguf", arch="gemma3", tokenizer="spm",
                           add_space_prefix=False, layers=6, heads=2, kv_heads=1, head_dim=256,
                           sliding_window=5, theta=1e6, embed_scale=0.3, chat_template=GEMMA_TEMPLATE,
                           control_tokens=("<start_of_turn>", "<end_of_turn>"))


def test_a_gemma3_gguf_gives_transformers_logits_and_greedy_tokens(gemma_gguf):
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name,
                                                            dtype=torch.float32).eval()
    model, tok = load_model(str(gemma_gguf), dtype="fp32")
    c = model.config
    assert c.gemma and c.window_layers == (0, 1, 2, 3, 4) and c.sliding_window == 5 and c.tie_embeddings
    assert_same_logits(ref, model, TOKENS)
    assert_greedy_like_transformers(ref, gemma_gguf, WAVES)
    assert tok.token_to_id("<end_of_turn>") in tok.eos_token_ids      # a turn's end stops the answer


def test_a_gemma3_ggufs_chat_renders_its_turns_as_transformers_does_and_ends_at_end_of_turn(gemma_gguf):
    ref = transformers.AutoTokenizer.from_pretrained(str(gemma_gguf.parent), gguf_file=gemma_gguf.name)
    _, tok = load_model(str(gemma_gguf), dtype="fp32")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world "},
            {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "sat on the mat"}]
    text = tok.apply_chat_template(chat)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><start_of_turn>user\nBe brief.\n\nHello world<end_of_turn>\n<start_of_turn>model\nthe cat"
                    "<end_of_turn>\n<start_of_turn>user\nsat on the mat<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.apply_chat_template(chat, tokenize=True)
    assert ids == ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids.count(tok.token_to_id("<start_of_turn>")) == 4               # each marker one token
    # the model's turn ends at <end_of_turn> (here made its likeliest token): the answer stops there
    end = tok.token_to_id("<end_of_turn>")
    engine = Engine(EngineConfig(model=str(gemma_gguf), dtype="fp32", kv_budget_bytes=1 << 20, batch_timeout_s=0.0))
    engine.add_request("0", prompt_token_ids=ids, params=SamplingParams(max_tokens=8, logit_bias={end: 100.0}))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == [end] and outs[-1].finish_reason == "stop"


def test_a_gemma3_gguf_without_its_sliding_window_or_post_norms_is_refused(tmp_path, gemma_gguf):
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    def rewrite(dst, drop_key=None, drop_tensor=None, arch=None):
        r = GGUFReader(str(gemma_gguf))
        w = GGUFWriter(str(dst), arch or "gemma3")
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.name in ("general.architecture", drop_key):
                continue
            name = f.name if arch is None else f.name.replace("gemma3.", arch + ".")
            kind = f.types[0]
            if kind == GGUFValueType.ARRAY:
                w.add_array(name, f.contents())
            else:
                w.add_key_value(name, f.contents(), kind)
        for t in r.tensors:
            if t.name != drop_tensor:
                w.add_tensor(t.name, t.data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return dst

    with pytest.raises(ModelFileProblem, match="lacks 'gemma3.attention.sliding_window'"):
        check_model_path(rewrite(tmp_path / "a.gguf", drop_key="gemma3.attention.sliding_window"))
    with pytest.raises(ModelFileProblem, match="missing tensors: blk.3.post_ffw_norm.weight"):
        check_model_path(rewrite(tmp_path / "b.gguf", drop_tensor="blk.3.post_ffw_norm.weight"))
    with pytest.raises(ModelFileProblem, match="tensor 'blk.0.post_attention_norm.weight' is a norm of the "
                                               "attention's output, which only a gemma3 model has"):
        check_model_path(rewrite(tmp_path / "c.gguf", arch="qwen3"))


# -- the paths that compute llama's layers ------------------------------------------------------

def _greedy(runner_or_path, prompts, n=8, **kw):
    engine = Engine(EngineConfig(model=str(runner_or_path), dtype="fp32", kv_budget_bytes=1 << 20,
                                 batch_timeout_s=0.0, block_size=8, prefill_chunk=8, **kw))
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), prompt_token_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True))
    got = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [got[str(i)] for i in range(len(prompts))], engine


def test_with_the_native_library_a_gemma3_model_decodes_on_the_eager_path(monkeypatch, tmp_path, tiny_tokenizer):
    """The native kernels compute llama's layers: where they load, a Gemma model's runner takes
    none of their steps, and its tokens are transformers' (a library that would be asked to run
    the model here is a stand-in that cannot)."""
    from pipeline_dsl.engine.native import step as native_step

    folder = save_gemma(tmp_path, tiny_tokenizer)
    monkeypatch.setattr(native_step, "load", lambda: object())       # "the library loaded"
    prompts = [ids for wave in WAVES for ids in wave]
    got, engine = _greedy(folder, prompts)
    assert engine.runner.native is None
    ref = reference(folder)
    for ids, out in zip(prompts, got):
        with torch.no_grad():
            assert out == ref(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()


def test_flex_attention_and_cuda_graphs_leave_a_gemma3_model_to_the_gather_path(tmp_path, tiny_tokenizer, caplog):
    """Flex attention asked for by name cannot serve a Gemma model (a clear error, as for any model
    it cannot serve); the graphs' capture says why it leaves every step eager. The runner's steps
    (asked to pad as on CUDA: a Gemma model's are not, no graph replays them) give the tokens of the
    model's own forward."""
    from test_gpu_path import EagerGraphs

    from pipeline_dsl.engine.model import ModelRunner, SeqBatchItem

    model, _ = load_model(str(save_gemma(tmp_path, tiny_tokenizer)), dtype="fp32")
    with pytest.raises(ValueError, match="attention = flex cannot serve here: .*Gemma 3's"):
        ModelRunner(model, num_blocks=16, block_size=8, attention="flex")
    runner = ModelRunner(model, num_blocks=16, block_size=8, pad_decode=True)
    runner.native = None
    with caplog.at_level("WARNING", logger="agp.model"):
        got = runner.capture_graphs(max_batch=4, max_len=64, graph_factory=EagerGraphs(), max_tokens=16)
    assert got["graphs"] == 0 and "not Gemma 3's" in got["fallback"] and runner.graphs is None
    assert "every step runs eagerly" in caplog.text
    alone = ModelRunner(model, num_blocks=16, block_size=8)              # CPU: a lone decode reads its slots
    alone.native = None
    ids = TOKENS[:20]
    want = model.forward_full(ids + [9, 4, 77])                          # [23, V]
    for r, table, beside in ((runner, [0, 1, 2], [SeqBatchItem([5], 0, [3], True)]),   # two, masked
                             (alone, [0, 1, 2], []), (alone, [5, 3, 4], [])):          # one slice; gathered
        first = r.execute([SeqBatchItem(ids, 0, table, True)])[0]
        steps = [r.execute([SeqBatchItem([t], 20 + i, table, True), *beside])[0] for i, t in enumerate([9, 4, 77])]
        assert (first - want[19]).abs().max() < 1e-4
        assert all((s - want[20 + i]).abs().max() < 1e-4 for i, s in enumerate(steps))


def test_batch_invariant_steps_of_a_gemma3_model_are_its_own(tmp_path, tiny_tokenizer, monkeypatch):
    """The batch-invariant attention computes the window and the query scale too: transformers' tokens."""
    folder = save_gemma(tmp_path, tiny_tokenizer)
    prompts = [ids for wave in WAVES for ids in wave]
    monkeypatch.setenv("AGP_BATCH_INVARIANT", "1")                   # reproducible answers (docs/engine.md)
    got, engine = _greedy(folder, prompts)
    assert engine.runner.batch_invariant
    ref = reference(folder)
    for ids, out in zip(prompts, got):
        with torch.no_grad():
            assert out == ref(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()


# -- precision, padding, tables, names ----------------------------------------------------------

def test_a_bf16_gemma3_keeps_its_norms_in_float32_as_transformers_does(tmp_path, tiny_tokenizer):
    """A bf16 checkpoint run in bf16: every RMSNorm computes x * (1 + w) in float32 (1 + w not
    rounded to bf16) and casts the result, as transformers' Gemma3RMSNorm; the logits stay as
    close to transformers' bf16 ones as that arithmetic allows (norms applied in bf16 drift by
    0.013 on average here, float32 ones by 0.009)."""
    from safetensors.torch import load_file, save_file

    folder = save_gemma(tmp_path, tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: t.bfloat16() for k, t in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    ids = list(range(3, 60)) + list(range(100, 160))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()             # [T, V]
    model, _ = load_model(str(folder), dtype="bf16")
    got = model.forward_full(ids)
    assert (got - want).abs().mean().item() < 0.011


def test_a_gemma3_decode_batch_is_not_padded_where_no_graph_replays_it(tmp_path, tiny_tokenizer):
    """No CUDA graph runs a Gemma model's steps: a decode batch of 9 sequences runs as 9 rows
    (padding = true pads a llama's to its bucket of 16 for a graph), and the answers are the same."""
    folder = save_gemma(tmp_path, tiny_tokenizer)
    answers = []
    for padding in (True, False):
        engine = Engine(EngineConfig(model=str(folder), dtype="fp32", kv_budget_bytes=1 << 20, batch_timeout_s=0.0,
                                     block_size=8, padding=padding))
        prepare, rows = engine.runner.prepare, []

        def seen(batch, prepare=prepare, rows=rows):
            step = prepare(batch)
            if step.all_decode:
                rows.append(int(step.tokens.shape[0]))
            return step

        engine.runner.prepare = seen
        for i in range(9):
            engine.add_request(str(i), prompt_token_ids=[5 + i] * 10,
                               params=SamplingParams(max_tokens=4, ignore_eos=True))
        got = {}
        while engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert rows and set(rows) == {9}
        answers.append(got)
    assert answers[0] == answers[1]


def test_a_gemma3_model_builds_its_two_rotary_tables_and_no_third(tmp_path, tiny_tokenizer, monkeypatch):
    """The full layers' table and the sliding layers', each once (not llama's one besides, to be
    thrown away: at 131072 positions each is seconds and hundreds of MB)."""
    from pipeline_dsl.engine import gemma, model as llama

    built = []

    def counted(*args, real=llama.rope_table, **kw):
        built.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(llama, "rope_table", counted)
    monkeypatch.setattr(gemma, "rope_table", counted)
    model, _ = load_model(str(save_gemma(tmp_path, tiny_tokenizer)), dtype="fp32")
    assert sorted(built) == [1e4, 1e6]
    full = llama.rope_table(32, 1e6, model.config.rope_scaling, 256)
    assert torch.equal(model.cos[:, 0], full[0].float()) and torch.equal(model.sin[:, 1],
                                                                          llama.rope_table(32, 1e4, (), 256)[1].float())


def test_fp16_is_refused_for_a_gemma3_model_naming_bf16_and_fp32(tmp_path, tiny_tokenizer):
    """Gemma 3's activations overflow float16: an engine asked for fp16 refuses at load, naming the
    dtypes that run it, as a user error (exit status 2), not a model of inf logits."""
    from pipeline_dsl.engine.errors import InputError

    folder = save_gemma(tmp_path, tiny_tokenizer)
    with pytest.raises(InputError, match="dtype fp16 cannot run Gemma 3.*use bf16 or fp32"):
        Engine(EngineConfig(model=str(folder), dtype="fp16", kv_budget_bytes=1 << 20))


def test_a_multimodal_checkpoints_vision_tensors_have_no_text_model_name():
    from pipeline_dsl.model_files.gemma import hf_gemma_name

    assert hf_gemma_name("vision_tower.vision_model.embeddings.patch_embedding.weight") is None
    assert hf_gemma_name("model.multi_modal_projector.mm_input_projection_weight") is None
    assert hf_gemma_name("language_model.model.norm.weight") == "model.norm.weight"
    assert hf_gemma_name("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_gemma_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
