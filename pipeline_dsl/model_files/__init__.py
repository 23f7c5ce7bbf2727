"""Model files checked without loading weights: stdlib only, so `agp check` can use it.

    header = read_gguf_header("m.gguf")    # magic, version, metadata, tensor infos
    config = gguf_llama_config(header)     # LlamaConfig fields, every value and shape checked
    config = hf_llama_config(folder)       # the same for config.json + *.safetensors headers
    check_model_path(path)                 # all of the above (and tokenizer.json for a folder)

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
"""

from __future__ import annotations

from pathlib import Path

from .gguf_header import DEQUANTIZABLE, GGML_TYPES, GGUFArray, GGUFHeader, GGUFTensorInfo, read_gguf_header
from .hf import hf_config, hf_llama_config, read_json_object, read_safetensors_header
from .llama import (GGUF_REQUIRED, GGUF_USED_KEYS, check_weights, expected_shapes, gguf_engine_name,
                    gguf_file_name, gguf_llama_config, hf_engine_name, hf_file_name)
from .problem import ModelFileProblem

__all__ = ["DEQUANTIZABLE", "GGML_TYPES", "GGUF_REQUIRED", "GGUF_USED_KEYS", "GGUFArray", "GGUFHeader",
           "GGUFTensorInfo", "ModelFileProblem", "check_model_path", "check_weights", "expected_shapes",
           "gguf_engine_name", "gguf_file_name", "gguf_llama_config", "hf_config", "hf_engine_name",
           "hf_file_name", "hf_llama_config", "read_gguf_header", "read_json_object",
           "read_safetensors_header"]


def check_model_path(path) -> None:
    """Everything that can be known about a model file or folder without reading weights."""
    path = Path(path)
    if path.is_dir():
        hf_llama_config(path)
        read_json_object(path / "tokenizer.json", "tokenizer.json")
        if (path / "tokenizer_config.json").exists():
            read_json_object(path / "tokenizer_config.json", "tokenizer_config.json")
        return
    if path.suffix.lower() != ".gguf":
        raise ModelFileProblem(path, "not a .gguf file")
    gguf_llama_config(read_gguf_header(path, arrays=False))
