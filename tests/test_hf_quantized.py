"""4-bit Hugging Face checkpoints (AWQ, GPTQ) run as the dense model they stand for, or are refused
saying which setting of config.json's quantization_config agp does not read.

Each test saves a tiny random Llama with transformers, quantizes its linear layers here (groups,
zero points, act order) and packs them as each format lays them out, written from the formats'
description and independently of agp's reader: AWQ's qweight [in, out/8] with nibble i holding
output column 8c + (0 2 4 6 1 3 5 7)[i]; GPTQ's qweight [in/p, out] holding p consecutive inputs,
its qzeros storing z - 1 in the v1 checkpoint format (GPTQModel's: the packed word less 0x11111111,
a zero of 0 borrowing from the next field). The dequantized weights (w = (q - z) * s)
go to a dense folder that transformers runs: agp's fp32 logits on the quantized folder must be
transformers' on the dense one.
"""

import json
import re

import numpy as np
import pytest
import torch

from clikit import ROOT, agp_in
from pipeline_dsl.engine.models import load_model, load_weights, resolve_model
from pipeline_dsl.model_files import ModelFileProblem, check_model_path

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after transformers' importorskip)

TOKENS = [5, 77, 130, 9, 260, 41, 3, 200, 17, 99, 150, 64, 12, 240, 8, 33] * 2
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_NIBBLE_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_gguf):
    _, tok = load_model(str(tiny_gguf), dtype="fp32")
    return tok


def save_dense(folder, tok, cls="LlamaConfig"):
    """A tiny model (hidden 128, MLP 256) saved by transformers with the tiny tokenizer."""
    cfg = getattr(transformers, cls)(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    tok.tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_tokenizer):
    return save_dense(tmp_path_factory.mktemp("dense"), tiny_tokenizer)


def quantize(w: np.ndarray, bits: int, group: int, sym: bool, rng, act_order: bool = False, scale_dtype=np.float16):
    """w [out, in] -> (codes [in, out], zeros [G, out], scales [G, out] (fp16, or `scale_dtype`), g_idx [in],
    dequantized [out, in])."""
    n, k = w.shape
    size = k if group == -1 else group
    top = (1 << bits) - 1
    g_idx = np.arange(k) // size
    if act_order:                      # act order: the groups are taken over the inputs in another order
        g_idx = g_idx[np.argsort(rng.permutation(k))]
    groups = g_idx.max() + 1
    scales, zeros = np.zeros((groups, n), scale_dtype), np.zeros((groups, n), np.int64)
    for j in range(groups):
        cols = w[:, g_idx == j]
        if sym:
            s, z = np.abs(cols).max(1) / ((top + 1) // 2 - 1), np.full(n, (top + 1) // 2)
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            s = (hi - lo) / top
            z = np.clip(np.round(-lo / s), 0, top)
        scales[j], zeros[j] = s.astype(scale_dtype), z
    s32 = scales.astype(np.float32)
    codes = np.clip(np.round(w.T / s32[g_idx]) + zeros[g_idx], 0, top).astype(np.int64)    # [in, out]
    deq = ((codes - zeros[g_idx]).astype(np.float32) * s32[g_idx]).T
    return codes, zeros, scales, g_idx, np.ascontiguousarray(deq)


def pack_fields(values: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """values (0 .. 2^bits - 1) -> int32, 32/bits consecutive along `axis` in one, the first in the
    lowest bits; `order[i]`: which of the run sits in field i."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    order = list(range(per)) if order is None else order
    out = np.zeros(v.shape[:-1], np.uint64)
    for field, which in enumerate(order):
        out |= v[..., which] << np.uint64(bits * field)
    return np.ascontiguousarray(np.moveaxis(out.astype(np.uint32).view(np.int32), -1, axis))


def gptq_v1_zeros(zeros: np.ndarray, bits: int, form: str) -> np.ndarray:
    """GPTQ's v1 qzeros of the zeros [G, out]: "word", GPTQModel's (the packed int32 less 0x11111111,
    0x01010101 for 8 bits, a field of 0 borrowing from the next); "field", each field z - 1 in its bits."""
    if form == "field":
        return pack_fields((zeros - 1) & ((1 << bits) - 1), bits, 1)
    ones = sum(1 << f for f in range(0, 32, bits))
    words = pack_fields(zeros, bits, 1).view(np.uint32).astype(np.int64)
    return np.ascontiguousarray(((words - ones) & 0xFFFFFFFF).astype(np.uint32).view(np.int32))


def write_quantized(dense_folder, out, method: str, qc: dict, *, bits=4, group=128, sym=False,
                    act_order=False, v1="word", seed=1, zero_rows=slice(0, None, 3), skip=(),
                    scale_dtype=np.float16, key="quantization_config", config_extra=None):
    """A quantized copy of the dense folder in `out` and the dense folder of its dequantized weights.
    `zero_rows`: outputs made non-negative, whose zero point is then 0 (asymmetric); `v1`: GPTQ's v1
    form of the zeros (gptq_v1_zeros), or False: v2's; `skip`: module prefixes left unquantized."""
    rng = np.random.default_rng(seed)
    tensors = load_file(str(dense_folder / "model.safetensors"))
    qfolder, dfolder = out / "quantized", out / "dequantized"
    qt, dt = {}, dict(tensors)
    for name in list(tensors):
        module = name[:-len(".weight")]
        if not name.endswith(".weight") or not module.endswith(LINEARS) or module.startswith(tuple(skip)):
            qt[name] = tensors[name]
            continue
        w = tensors[name].numpy().copy()
        if not sym:
            w[zero_rows] = np.abs(w[zero_rows])
        codes, zeros, scales, g_idx, deq = quantize(w, bits, group, sym, rng, act_order, scale_dtype)
        dt[name] = torch.from_numpy(deq)
        if method.lower().replace("_", "-") == "compressed-tensors":   # codes, zeros unsigned (signed + 2^(bits-1))
            qt[module + ".weight_packed"] = torch.from_numpy(pack_fields(codes.T, bits, 1))
            qt[module + ".weight_scale"] = torch.from_numpy(np.ascontiguousarray(scales.T))
            qt[module + ".weight_shape"] = torch.tensor(list(deq.shape))
            if not sym:
                qt[module + ".weight_zero_point"] = torch.from_numpy(pack_fields(zeros.T, bits, 0))
            if act_order:
                qt[module + ".weight_g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
            continue
        if method == "awq":
            qt[module + ".qweight"] = torch.from_numpy(pack_fields(codes, 4, 1, AWQ_NIBBLE_COLUMN))
            qt[module + ".qzeros"] = torch.from_numpy(pack_fields(zeros, 4, 1, AWQ_NIBBLE_COLUMN))
        else:
            qt[module + ".qweight"] = torch.from_numpy(pack_fields(codes, bits, 0))
            qt[module + ".qzeros"] = torch.from_numpy(gptq_v1_zeros(zeros, bits, v1) if v1
                                                      else pack_fields(zeros, bits, 1))
            qt[module + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        qt[module + ".scales"] = torch.from_numpy(scales)
    config = json.loads((dense_folder / "config.json").read_text())
    for folder, weights, extra in ((qfolder, qt, {key: {"quant_method": method, **qc}, **(config_extra or {})}),
                                   (dfolder, dt, {})):
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).write_bytes((dense_folder / f).read_bytes())
    return qfolder, dfolder


def assert_same_logits(qfolder, dfolder):
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(dfolder), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([TOKENS])).logits[0]
    model, _ = load_model(str(qfolder), dtype="fp32")
    got = model.forward_full(TOKENS)
    assert want.abs().max() > 1
    assert (got - want).abs().max().item() < 1e-4
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


AWQ = {"bits": 4, "version": "gemm"}


def ct(bits=4, group=128, sym=True, actorder=None):
    """compressed-tensors' quantization_config of a weight-only scheme (llm-compressor's W4A16's form)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group != -1 else "channel",
               "group_size": group if group != -1 else None, "actorder": actorder, "dynamic": False}
    return {"format": "pack-quantized", "quantization_status": "compressed", "ignore": ["lm_head"],
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None}}}

CASES = {
    "awq-g128": ("awq", {**AWQ, "group_size": 128, "zero_point": True}, dict(group=128)),
    "awq-g64": ("awq", {**AWQ, "group_size": 64, "zero_point": True}, dict(group=64)),
    "awq-g32": ("awq", {"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"}, dict(group=32)),
    "awq-column": ("awq", {**AWQ, "group_size": -1, "zero_point": True}, dict(group=-1)),
    "awq-no-zero-point": ("awq", {**AWQ, "group_size": 128, "zero_point": False}, dict(group=128, sym=True)),
    # transformers 5's AwqConfig: the layout in format (and version), backend the kernel that runs it
    "awq-transformers-5": ("awq", {"bits": 4, "group_size": 64, "zero_point": True, "backend": "auto",
                                   "format": "gemm", "version": "gemm"}, dict(group=64)),
    "awq-gptqmodel": ("awq", {"bits": 4, "group_size": 64, "zero_point": True, "format": "gemm",
                              "checkpoint_format": "gemm", "sym": False, "rotation": None}, dict(group=64)),
    "gptq-sym-v1": ("gptq", {"bits": 4, "group_size": 128, "sym": True, "desc_act": False}, dict(sym=True)),
    "gptq-asym-v1-g32": ("gptq", {"bits": 4, "group_size": 32, "sym": False}, dict(group=32)),
    "gptq-asym-v1-per-field-zeros": ("gptq", {"bits": 4, "group_size": 32, "sym": False},
                                     dict(group=32, v1="field", zero_rows=slice(7, None, 8))),
    "gptq-upper-case": ("GPTQ", {"bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "GPTQ"},
                        dict(group=64)),
    # GPTQModel: layer 0's linears skipped ("-:"), so held as plain weights
    "gptq-dynamic-skip": ("gptq", {"bits": 4, "group_size": 64, "sym": False, "rotation": "",
                                   "dynamic": {"-:model\\.layers\\.0\\..*": {}}},
                          dict(group=64, skip=("model.layers.0.",))),
    "gptq-asym-v2": ("gptq", {"bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"},
                     dict(group=64, v1=False)),
    "gptq-desc-act": ("gptq", {"bits": 4, "group_size": 32, "sym": True, "desc_act": True},
                      dict(group=32, sym=True, act_order=True)),
    "gptq-column": ("gptq", {"bits": 4, "group_size": -1, "sym": False}, dict(group=-1)),
    "gptq-8bit-desc-act": ("gptq", {"bits": 8, "group_size": 64, "sym": False, "desc_act": True},
                           dict(bits=8, group=64, act_order=True)),
    "ct-w4a16-sym": ("compressed-tensors", ct(), dict(sym=True)),
    "ct-w4a16-asym-g32": ("compressed-tensors", ct(group=32, sym=False), dict(group=32)),
    "ct-w4a16-channel": ("compressed-tensors", ct(group=-1, sym=False), dict(group=-1)),
    "ct-w4a16-actorder": ("compressed-tensors", ct(group=64, actorder="group"),
                          dict(group=64, sym=True, act_order=True)),
    "ct-w8a16": ("compressed-tensors", ct(bits=8, group=-1), dict(bits=8, group=-1, sym=True)),
    "ct-actorder-true": ("compressed-tensors", ct(group=64, actorder=True), dict(group=64, sym=True, act_order=True)),
    "ct-actorder-dynamic": ("compressed-tensors", ct(group=64, actorder="dynamic"),
                            dict(group=64, sym=True, act_order=True)),
    "ct-actorder-false": ("compressed-tensors", ct(group=64, actorder=False), dict(group=64, sym=True)),
    "ct-fp32-scales": ("compressed-tensors", ct(group=32, sym=False), dict(group=32, scale_dtype=np.float32)),
    # as vLLM reads them: compressed-tensors' older key, and spellings normalised
    "ct-compression-config": ("compressed_tensors", {**ct(group=64), "format": "Pack_Quantized"},
                              dict(group=64, sym=True, key="compression_config")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_quantized_folder_gives_transformers_logits_of_its_dequantized_weights(tmp_path, dense, case):
    method, qc, kw = CASES[case]
    qfolder, dfolder = write_quantized(dense, tmp_path, method, qc, **kw)
    check_model_path(qfolder)                         # agp check's reading: accepted
    assert_same_logits(qfolder, dfolder)


@pytest.mark.parametrize("method, qc", [("awq", {**AWQ, "group_size": 64}), ("gptq", {"bits": 4, "group_size": 32})])
def test_a_quantized_qwen2_folder_keeps_its_float_qkv_biases(tmp_path, tiny_tokenizer, method, qc):
    """Qwen2.5's AWQ and GPTQ checkpoints: the linears quantized, their q, k, v biases in float."""
    dense_qwen2 = save_dense(tmp_path / "dense", tiny_tokenizer, cls="Qwen2Config")
    qfolder, dfolder = write_quantized(dense_qwen2, tmp_path, method, qc, group=qc["group_size"])
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(qfolder / "model.safetensors"))
    assert_same_logits(qfolder, dfolder)


def test_a_layer_whose_unpacked_shape_is_not_the_configs_is_refused_saying_both(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "awq", {**AWQ, "group_size": 64}, group=64)
    config = json.loads((qfolder / "config.json").read_text())
    (qfolder / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    with pytest.raises(ModelFileProblem, match=r"'model\.layers\.0\.mlp\.down_proj\.qweight' has shape \[256, 16\]: a "
                                               r"layer of 256 inputs and 128 outputs, but config.json needs 512 "
                                               r"inputs and 128 outputs"):
        check_model_path(qfolder)


def test_4bit_groups_in_input_order_are_kept_as_int4_blocks_equal_to_the_weight(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 64, "sym": False}, group=64)
    _, weights, _ = load_weights(resolve_model(str(qfolder)))
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o", "gate", "up", "down")]
    assert sorted(weights.int4) == sorted(names)
    for name in names:                               # (q - 8) * s + (8 - z) * s is (q - z) * s, exactly
        assert torch.equal(weights.int4[name].dequantized(), weights[name])


def test_4bit_groups_of_fp32_scales_are_dequantized_only(tmp_path, dense):
    """compressed-tensors allows fp32 scales, whose (q - 8) * s + (8 - z) * s may round away from (q - z) * s."""
    qfolder, _ = write_quantized(dense, tmp_path, "compressed-tensors", ct(group=32, sym=False), group=32,
                                 scale_dtype=np.float32)
    _, weights, _ = load_weights(resolve_model(str(qfolder)))
    assert weights.int4 == {}


def test_act_order_groups_are_dequantized_only(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 32, "desc_act": True},
                                 group=32, sym=True, act_order=True)
    _, weights, _ = load_weights(resolve_model(str(qfolder)))
    assert weights.int4 == {}


@pytest.mark.parametrize("qc, words", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'version' is \"gemv\""),
    ({"quant_method": "awq", "bits": 3, "version": "gemm"}, "'bits' is 3"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "backend": "llm-awq"}, "'backend' is \"llm-awq\""),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "'bits' is 3"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'checkpoint_format' is \"marlin\""),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"+:.*down": {"bits": 8}}}, "'dynamic'"),
    ({"quant_method": "gptq", "bits": 4, "dynamic": {"-:.*up": {}, ".*down": {"group_size": 32}}}, "'dynamic'"),
    ({"quant_method": "gptq", "bits": 4, "rotation": "hadamard"}, "'rotation' is \"hadamard\""),
    ({"quant_method": "awq", "bits": 4, "version": "gemm", "rotation": "random"}, "'rotation' is \"random\""),
    ({"quant_method": "awq", "bits": 4, "format": "gemv", "backend": "auto"}, "'format' is \"gemv\""),
    ({"quant_method": "awq", "bits": 4, "format": "llm-awq"}, "'format' is \"llm-awq\""),
    ({"quant_method": "gptq", "bits": 4.0, "group_size": 128}, "'bits' must be an integer number of bits, not 4.0"),
    ({"quant_method": "awq", "w_bit": 4.0, "version": "gemm"}, "'w_bit' must be an integer number of bits, not 4.0"),
    ({"quant_method": "compressed-tensors", **ct(), "config_groups": {"group_0": {
        **ct()["config_groups"]["group_0"],
        "weights": {**ct()["config_groups"]["group_0"]["weights"], "num_bits": 4.0}}}},
     "'num_bits' must be an integer number of bits, not 4.0"),
    ({"quant_method": "compressed-tensors", **ct(), "kv_cache_scheme": {"num_bits": 8, "type": "float"}},
     "'kv_cache_scheme' is set"),
    ({"quant_method": "compressed-tensors", **ct(), "format": "float-quantized"}, "'format' is \"float-quantized\""),
    ({"quant_method": "compressed-tensors", **ct(), "config_groups": {"group_0": {
        **ct()["config_groups"]["group_0"], "input_activations": {"num_bits": 8, "type": "int"}}}},
     "'input_activations' is set"),
    ({"quant_method": "compressed-tensors", **ct(), "transform_config": {"config_groups": {}}},
     "'transform_config' is set"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "\"bitsandbytes\" is not supported"),
], ids=["awq-gemv", "awq-3bit", "awq-llm-awq", "gptq-3bit", "gptq-marlin", "gptq-dynamic", "gptq-dynamic-mixed",
        "gptq-rotation", "awq-rotation", "awq-format-gemv", "awq-format-llm-awq", "gptq-float-bits", "awq-float-bits",
        "ct-float-bits", "ct-kv-cache", "ct-fp8", "ct-w8a8", "ct-transform", "bnb"])
def test_a_quantization_agp_does_not_read_is_refused_naming_config_json_and_the_key(tmp_path, dense, qc, words):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 128})
    config = json.loads((qfolder / "config.json").read_text())
    (qfolder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(ModelFileProblem, match=words) as e:
        check_model_path(qfolder)
    assert e.value.path == str(qfolder / "config.json")
    with pytest.raises(Exception, match=words):      # the loader reads config.json the same way
        load_model(str(qfolder), dtype="fp32")


def test_a_gemma3_folder_quantization_config_is_read_from_its_text_config():
    """A multimodal folder's config.json may hold the quantization config in its text_config (vLLM reads it
    there): it is read, and refused by its key there as one at the top is."""
    from pipeline_dsl.model_files.quantized import hf_quant_spec

    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"}
    spec = hf_quant_spec({"model_type": "gemma3", "text_config": {"quantization_config": qc}}, "config.json")
    assert (spec.method, spec.bits, spec.group_size, spec.zeros_minus_one) == ("gptq", 4, 64, False)
    with pytest.raises(ModelFileProblem, match=r"text_config\.quantization_config's 'bits' is 3"):
        hf_quant_spec({"model_type": "gemma3", "text_config": {"quantization_config": {**qc, "bits": 3}}},
                      "config.json")


def chat_on_quantized(folder):
    """examples/chat.agp written into `folder`, its model the folder's quantized/."""
    program = folder / "chat.agp"
    chat = (ROOT / "examples" / "chat.agp").read_text()
    program.write_text(re.sub(r'(?m)^(\s*model\s*=\s*)"[^"]*"', r'\1"quantized"', chat, count=1))
    return program


def test_a_float_bit_count_is_refused_by_agp_check_with_exit_2(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4.0, "group_size": 128, "sym": True}, sym=True)
    r = agp_in("check", chat_on_quantized(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert "error: bad model file 'quantized/config.json': quantization_config's 'bits' must be an integer " \
           "number of bits, not 4.0" in r.stderr


def test_agp_check_accepts_a_gptq_folder_and_refuses_an_unread_setting_with_exit_2(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 128, "sym": True}, sym=True)
    program = chat_on_quantized(tmp_path)
    r = agp_in("check", program, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads((qfolder / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (qfolder / "config.json").write_text(json.dumps(config))
    r = agp_in("check", program, cwd=tmp_path)
    assert r.returncode == 2
    assert "error: bad model file 'quantized/config.json': quantization_config's 'checkpoint_format' is " \
           "\"marlin\"" in r.stderr


def test_quantized_tensors_without_a_quantization_config_are_refused_by_name(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "awq", AWQ)
    config = json.loads((qfolder / "config.json").read_text())
    del config["quantization_config"]
    (qfolder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileProblem, match=r"\.(qweight|qzeros|scales)' is a quantized layer's, but config.json "
                                               r"has no"):
        check_model_path(qfolder)


def test_a_scales_tensor_of_the_wrong_group_count_is_refused_by_name(tmp_path, dense):
    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 64}, group=64)
    config = json.loads((qfolder / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32             # the file's are groups of 64
    (qfolder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileProblem, match=r"'model\.layers\.\d\.\S+\.qzeros' has shape \[\d+, \d+\], but a GPTQ "
                                               r"4-bit, groups of 32 layer"):
        check_model_path(qfolder)


def test_a_g_idx_naming_a_group_the_layer_has_not_is_refused_at_load_naming_the_file_and_layer(tmp_path, dense):
    from pipeline_dsl.engine.errors import ModelFileError

    qfolder, _ = write_quantized(dense, tmp_path, "gptq", {"bits": 4, "group_size": 64, "desc_act": True},
                                 group=64, act_order=True)
    tensors = load_file(str(qfolder / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.g_idx"][5] = 2             # a layer of 128 inputs has groups 0 and 1
    save_file(tensors, str(qfolder / "model.safetensors"))
    check_model_path(qfolder)                                      # the header is fine: the values are the weights'
    with pytest.raises(ModelFileError, match=r"model\.safetensors: the g_idx of layer "
                                             r"'model\.layers\.1\.mlp\.up_proj' names groups outside its 2"):
        load_model(str(qfolder), dtype="fp32")
