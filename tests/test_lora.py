"""LoRA adapters (engine/lora.py): PEFT folders read and refused by name, their deltas applied
per sequence beside the base weights (a step mixes adapters and the base model), equal to the
model with the adapter merged into its weights, and the prefix cache keyed by adapter."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline_dsl.engine import InputError, SamplingParams
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine import native
from pipeline_dsl.engine.lora import LoraError, LoraWeights, check_fits, read_adapter, step_lora
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from tiny_lora import PREFIX, write_tiny_lora
from tiny_model import tiny_engine, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BS = 4
NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return load_gguf(tiny_gguf)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": write_tiny_lora(root / "a", seed=1, strength=1.0),
            "b": write_tiny_lora(root / "b", seed=2, r=8, alpha=4, targets=("q_proj", "v_proj", "down_proj"),
                                 config={"use_rslora": True}),
            "strong": write_tiny_lora(root / "strong", seed=3, strength=30.0)}


def merged(tiny, folder) -> LlamaModel:
    """The tiny model with the adapter merged into its weights: W + scale * B @ A."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    weights = dict(tiny.weights)
    for layer in range(tiny.config.num_layers):
        for peft, name in NAMES.items():
            part = "self_attn" if name in ("q", "k", "v", "o") else "mlp"
            key = f"{PREFIX}.{layer}.{part}.{peft}"
            if f"{key}.lora_A.weight" in t:
                w = weights[f"layers.{layer}.{name}"]
                delta = scale * t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()
                weights[f"layers.{layer}.{name}"] = (torch.as_tensor(w).double() + delta).float()
    return LlamaModel(tiny.config, weights, "fp32")


def ids(n, seed):
    return np.random.default_rng(seed).integers(3, 290, size=n).tolist()


def runner_with(model, tiny, folders, names=("a", "b", "strong")):
    runner = ModelRunner(model, num_blocks=96, block_size=BS)
    for name in names:
        runner.loras[name] = LoraWeights(read_adapter(folders[name], name), tiny.config, model.dtype, model.device)
    return runner


def feed(runner, seqs, decode_steps=3):
    """Prefill each (tokens, adapter) in two chunks, then decode greedily in steps of all of them
    together; the logits of every sampled row, per sequence, [steps, V]."""
    tables, out = [], [[] for _ in seqs]
    used = 0
    for toks, _ in seqs:
        n = -(-(len(toks) + decode_steps + 1) // BS)
        tables.append(list(range(used + 3, used + 3 + n)))
        used += n
    cut = [len(t) // 2 for t, _ in seqs]
    runner.execute([SeqBatchItem(t[:c], 0, tb, False, lora=a) for (t, a), c, tb in zip(seqs, cut, tables)])
    got = runner.execute([SeqBatchItem(t[c:], c, tb, True, lora=a) for (t, a), c, tb in zip(seqs, cut, tables)])
    pos = [len(t) for t, _ in seqs]
    for step in range(decode_steps):
        nxt = got.argmax(-1).tolist()
        for i, row in enumerate(got):
            out[i].append(row)
        got = runner.execute([SeqBatchItem([nxt[i]], pos[i], tables[i], True, lora=a)
                              for i, (_, a) in enumerate(seqs)])
        pos = [p + 1 for p in pos]
    for i, row in enumerate(got):
        out[i].append(row)
    return [torch.stack(rows) for rows in out]


def test_adapter_logits_equal_the_merged_models(tiny, folders):
    model = LlamaModel(tiny.config, tiny.weights, "fp32")
    runner = runner_with(model, tiny, folders)
    for name in ("a", "b"):
        toks = ids(13, 7)
        (got,) = feed(runner, [(toks, name)])
        ref_model = merged(tiny, folders[name])
        full = toks + got[:-1].argmax(-1).tolist()
        ref = ref_model.forward_full(full)[len(toks) - 1:]                 # the rows sampled above
        assert torch.allclose(got, ref, atol=2e-4, rtol=1e-4), (name, (got - ref).abs().max())
        base = model.forward_full(full)[len(toks) - 1:]
        assert (got - base).abs().max() > 1e-2                             # it did change something


@pytest.mark.parametrize("size", [5, 11])      # 11: more decode rows than a native step takes (the glued path)
def test_a_step_mixing_adapters_gives_each_row_what_it_gives_alone(tiny, folders, size):
    model = LlamaModel(tiny.config, tiny.weights, "fp32")
    names = ["a", None, "b", "a", None, "strong", None, "b", None, "a", None]
    seqs = [(ids(6 + i % 5, i), names[i]) for i in range(size)]
    together = feed(runner_with(model, tiny, folders), seqs)
    for (toks, name), got in zip(seqs, together):
        (alone,) = feed(runner_with(model, tiny, folders), [(toks, name)])
        assert torch.allclose(got, alone, atol=1e-4), name   # fp32 GEMMs of other row counts round apart


def test_neighbouring_sequences_of_one_adapter_each_get_it_over_all_their_rows(tiny, folders):
    """Sequences of one adapter side by side in a step, their chunks of different lengths (the
    adapter applied to their rows as one group), each give what they give alone: every row of
    the group has the adapter, and the base row after it has none."""
    model = LlamaModel(tiny.config, tiny.weights, "fp32")
    seqs = [(ids(6, 2), "a"), (ids(11, 1), "a"), (ids(8, 3), None)]
    together = feed(runner_with(model, tiny, folders), seqs)
    for (toks, name), got in zip(seqs, together):
        (alone,) = feed(runner_with(model, tiny, folders), [(toks, name)])
        assert torch.allclose(got, alone, atol=1e-4), name


def test_batch_invariant_mode_keeps_an_adapter_rows_logits_bit_for_bit(tiny, folders):
    """AGP_BATCH_INVARIANT's promise holds for adapter rows: a row's logits do not depend on the
    rows beside it (each row's delta is computed alone there)."""
    model = LlamaModel(tiny.config, tiny.weights, "fp32")

    def invariant_runner():
        runner = ModelRunner(model, num_blocks=96, block_size=BS, batch_invariant=True)
        runner.loras["a"] = LoraWeights(read_adapter(folders["a"], "a"), tiny.config, model.dtype, model.device)
        return runner

    seqs = [(ids(9, 1), "a"), (ids(11, 2), None), (ids(7, 3), "a"), (ids(10, 4), "a")]
    together = feed(invariant_runner(), seqs)
    for (toks, name), got in zip(seqs, together):
        (alone,) = feed(invariant_runner(), [(toks, name)])
        assert torch.equal(got, alone), name


def test_a_step_of_no_adapter_rows_is_the_base_models(tiny, folders):
    """Loaded adapters change nothing for the rows that name none (the native decode step included)."""
    model = LlamaModel(tiny.config, tiny.weights, "fp32")
    seqs = [(ids(9, 1), None), (ids(5, 2), None)]
    plain = feed(ModelRunner(model, num_blocks=96, block_size=BS), seqs)
    with_loras = feed(runner_with(model, tiny, folders), seqs)
    for a, b in zip(plain, with_loras):
        assert torch.equal(a, b)


def test_an_adapters_delta_is_computed_in_float32_and_rounded_once(tiny, folders):
    """On a bf16 model each adapter row's output is y + x A^T B^T computed in float32 and rounded
    once to bf16 (within half a bf16 ulp of the exact sum): computed in bf16, the product x A^T,
    the delta and the sum were each rounded, and moved a bf16 model's logits several times as far
    from the float32 model's as its base weights' rounding does."""
    cfg = tiny.config
    weights = LoraWeights(read_adapter(folders["strong"], "strong"), cfg, torch.bfloat16, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    out, inp = cfg.hidden_size, cfg.intermediate_size
    x = torch.randn(7, inp, generator=g).to(torch.bfloat16)
    y = torch.randn(7, out, generator=g).to(torch.bfloat16)
    a, b = weights.layers[1]["down"]
    exact = y.double() + (x.double() @ a.double().t()) @ b.double().t()
    for names, counts in ((["strong", None, "strong"], [2, 3, 2]), (["strong"], [7])):   # rows by index, a slice
        step = step_lora({"strong": weights}, names, np.cumsum([0] + counts[:-1]), counts, torch.device("cpu"))
        got = step.add(1, "down", y.clone(), x)
        rows = [r for n, c, o in zip(names, counts, np.cumsum([0] + counts[:-1])) if n for r in range(o, o + c)]
        others = [r for r in range(7) if r not in rows]
        assert torch.equal(got[others], y[others])
        err = (got[rows].double() - exact[rows]).abs()
        assert (err <= exact[rows].abs() * 2.0 ** -8 * 1.001 + 1e-30).all(), err.max()


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    return load_gguf(write_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", qtype="Q4_1"))


def test_an_adapter_over_4bit_blocks_is_no_further_from_float32_than_one_merged_into_bf16(tiny_q4, folders):
    """A Q4_1 file's linears on agp's int8 kernels (bf16 storage) with an adapter on some rows:
    its logits (prefill and decode steps, teacher-forced) keep as close to the float32 model with
    the adapter merged into the file's dequantised weights as merging it into bf16 weights would
    (measured: 1.6 here, 3.7 merged into bf16; 10.9 with the deltas computed in bf16); and the rows
    of a base model's sequence in the same steps stay the base model's."""
    if native.load() is None or not native.int8_dot_products():
        pytest.skip("agp's int8 kernels do not run here")
    q4 = tiny_q4
    model = LlamaModel(q4.config, q4.weights, "auto")
    assert model.linears_text().startswith("4-bit block weights on agp's int8 kernels"), model.linears_text()
    ref_base = LlamaModel(q4.config, dict(q4.weights), "fp32")      # the blocks dequantised: dense weights
    ref = merged(q4, folders["strong"])
    runner = runner_with(model, q4, folders, names=("strong",))
    bound = 4.0
    for seed in range(3):
        seqs = [(ids(14, seed), "strong", ref), (ids(14, seed + 10), None, ref_base)]
        tables = [list(range(3, 7)), list(range(7, 11))]
        rows = [runner.execute([SeqBatchItem(t[:6], 0, tb, True, lora=a) for (t, a, _), tb in zip(seqs, tables)])]
        for p in range(6, 14):
            rows.append(runner.execute([SeqBatchItem([t[p]], p, tb, True, lora=a)
                                        for (t, a, _), tb in zip(seqs, tables)]))
        for i, (toks, name, reference) in enumerate(seqs):
            got = torch.stack([r[i] for r in rows])                          # [9, V]: positions 5..13
            want = reference.forward_full(toks)[5:]
            err = (got - want).abs().max()
            if name is None:
                assert err < 1.0, (seed, err)                                # the base model's rounding alone
                continue
            assert err < bound, (seed, err)
            assert (got - ref_base.forward_full(toks)[5:]).abs().max() > 2 * bound   # the adapter changed them


def run(eng, rid, prompt, **params):
    eng.add_request(rid, prompt=prompt, params=SamplingParams(**params))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    return outs[-1]


def test_the_engine_answers_with_the_adapter_a_request_names(tiny_gguf, folders):
    eng = tiny_engine(tiny_gguf)
    eng.add_lora(read_adapter(folders["strong"], "strong"))
    assert eng.loras == ("strong",)
    prompt = "the quick brown fox jumps over the lazy dog"
    base = run(eng, "base", prompt, max_tokens=8).new_token_ids
    out = run(eng, "strong", prompt, max_tokens=8, lora="strong")
    assert out.new_token_ids != base
    assert run(eng, "base2", prompt, max_tokens=8).new_token_ids == base
    with pytest.raises(InputError, match="no LoRA adapter named 'nope'"):
        eng.add_request("x", prompt=prompt, params=SamplingParams(lora="nope"))


def test_the_engine_counts_the_adapters_of_running_and_waiting_requests(tiny_gguf, folders):
    eng = tiny_engine(tiny_gguf, max_batch_size=1)
    eng.add_lora(read_adapter(folders["a"], "a"))
    eng.add_lora(read_adapter(folders["b"], "b"))
    eng.add_request("1", prompt="hello", params=SamplingParams(max_tokens=4, lora="b"))
    eng.add_request("2", prompt="hello", params=SamplingParams(max_tokens=4, lora="a"))
    eng.step()
    s = eng.stats(latencies=False)
    assert (s["lora_adapters"], s["lora_running"], s["lora_waiting"]) == (["a", "b"], ["b"], ["a"])
    assert "lora_adapters" not in tiny_engine(tiny_gguf).stats(latencies=False)


def test_the_prefix_cache_is_not_shared_across_adapters(tiny_gguf, folders):
    eng = tiny_engine(tiny_gguf)
    eng.add_lora(read_adapter(folders["a"], "a"))
    eng.add_lora(read_adapter(folders["b"], "b"))
    prompt = "the quick brown fox jumps over the lazy dog " * 4

    def first(rid, **kw):
        out = run(eng, rid, prompt, max_tokens=4, **kw)
        return out.cached_tokens, out.new_token_ids

    fresh_a = first("a1", lora="a")
    assert fresh_a[0] == 0
    assert first("base", )[0] == 0                    # the base model's K/V are not the adapter's
    assert first("b1", lora="b")[0] == 0
    again = first("a2", lora="a")
    assert again[0] > 0 and again[1] == fresh_a[1]    # the same adapter shares its blocks
    assert first("a3", lora="a", cache_salt="s")[0] == 0 and first("base2")[0] > 0


# ---- refusals: each names the file and the key ---------------------------------------------------

def refused(folder, match, model=None):
    with pytest.raises(LoraError, match=match):
        adapter = read_adapter(folder)
        if model is not None:
            check_fits(adapter, model)


def test_unsupported_adapters_are_refused_naming_file_and_key(tmp_path, tiny):
    cfg = tiny.config
    refused(tmp_path / "none", "not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"empty/adapter_config.json: missing")
    f = write_tiny_lora(tmp_path / "nofile")
    (f / "adapter_model.safetensors").unlink()
    refused(f, r"adapter_model.safetensors: missing")
    refused(write_tiny_lora(tmp_path / "embed", config={"target_modules": ["q_proj", "embed_tokens"]}),
            r"adapter_config.json: target_modules: 'embed_tokens'")
    refused(write_tiny_lora(tmp_path / "head", extra={
        "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(300, 4)}),
        r"adapter_model.safetensors: base_model.model.lm_head.lora_[AB].weight: not a LoRA matrix")
    refused(write_tiny_lora(tmp_path / "save", config={"modules_to_save": ["lm_head"]}),
            r"adapter_config.json: modules_to_save")
    refused(write_tiny_lora(tmp_path / "dora", config={"use_dora": True}), r"adapter_config.json: use_dora: DoRA")
    refused(write_tiny_lora(tmp_path / "alora", config={"alora_invocation_tokens": [5, 6]}),
            r"adapter_config.json: alora_invocation_tokens: activated LoRA .* is not supported")
    refused(write_tiny_lora(tmp_path / "bias", config={"lora_bias": True}), r"adapter_config.json: lora_bias")
    refused(write_tiny_lora(tmp_path / "dora2", extra={
        f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}), r"lora_magnitude_vector.*DoRA")
    refused(write_tiny_lora(tmp_path / "rank", config={"r": 8}),
            r"lora_A.weight: has shape \[4, \d+\]: its rank 4 is not the config's r = 8")
    refused(write_tiny_lora(tmp_path / "wide", extra={
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 96)}),
        r"layers.0.self_attn.q_proj.lora_A.weight: has shape \[4, 96\]: the model's q projection takes 64", cfg)
    refused(write_tiny_lora(tmp_path / "deep", layers=(0, 5)), r"layers.5.mlp.down_proj.lora_A.weight: layer 5: the model has 2 layers", cfg)
    half = write_tiny_lora(tmp_path / "half")
    from safetensors.torch import load_file, save_file
    t = load_file(str(half / "adapter_model.safetensors"))
    del t[f"{PREFIX}.1.mlp.up_proj.lora_B.weight"]
    save_file(t, str(half / "adapter_model.safetensors"))
    refused(half, r"layers.1.mlp.up_proj.lora_A.weight: has no lora_B")


def test_an_engine_refuses_an_adapter_that_does_not_fit_its_model(tiny_gguf, tmp_path):
    eng = tiny_engine(tiny_gguf)
    bad = write_tiny_lora(tmp_path / "bad", extra={f"{PREFIX}.1.mlp.down_proj.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraError, match=r"down_proj.lora_B.weight: has shape \[32, 4\]: the model's down "
                                        r"projection has 64 outputs"):
        eng.add_lora(read_adapter(bad, "bad"))
    assert eng.loras == ()


@pytest.mark.parametrize("field, family", [("gemma", "Gemma 3"), ("fused", "Phi-3")])
def test_an_adapter_is_refused_for_a_family_whose_layers_it_is_not_added_to(tiny, folders, field, family):
    import dataclasses

    config = dataclasses.replace(tiny.config, **{field: True})
    with pytest.raises(LoraError, match=f"not to {family}'s layers"):
        check_fits(read_adapter(folders["a"], "a"), config)


@pytest.mark.parametrize("config, key", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights: 'pissa': PiSSA"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights: 'pissa_niter_4': PiSSA"),
    ({"init_lora_weights": "olora"}, "init_lora_weights: 'olora': OLoRA"),
    ({"init_lora_weights": "corda"}, "init_lora_weights: 'corda': CorDA"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights: 'loftq': LoftQ"),
    ({"loftq_config": {"loftq_bits": 4}}, "loftq_config: LoftQ"),
    ({"corda_config": {"cache_file": "c.pt"}}, "corda_config: CorDA"),
])
def test_an_adapter_of_base_weights_its_initialisation_changed_is_refused_with_the_way_to_convert_it(
        tmp_path, config, key):
    f = write_tiny_lora(tmp_path / "a", config=config)
    refused(f, f"adapter_config.json: {key} trains an adapter on base weights it changes.*"
               "path_initial_model_for_weight_conversion")


@pytest.mark.parametrize("config", [{"init_lora_weights": True}, {"init_lora_weights": "gaussian"},
                                    {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
                                    {"loftq_config": {}, "corda_config": None}])
def test_initialisations_that_leave_the_base_alone_are_read(tmp_path, config):
    assert read_adapter(write_tiny_lora(tmp_path / "a", config=config)).rank == 4


def test_a_fitted_adapter_keeps_no_host_copy_of_the_matrices_it_was_read_with(tiny, folders):
    """LoraWeights holds the matrices fitted to the model (its dtype and device) and the adapter's
    name, path and rank: the float32 matrices read from the folder are freed once it is fitted."""
    import gc
    import weakref

    model = LlamaModel(tiny.config, tiny.weights, "bf16")
    adapter = read_adapter(folders["a"], "a")
    read = [weakref.ref(t) for pair in adapter.pairs.values() for t in pair]
    weights = LoraWeights(adapter, tiny.config, model.dtype, model.device)
    del adapter
    gc.collect()
    assert [r for r in read if r() is not None] == []
    assert (weights.name, weights.path, weights.rank) == ("a", str(folders["a"]), 4)
