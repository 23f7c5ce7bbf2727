"""Semantic checks of one pipeline against the stage registry (no networkx, no torch).

`check_pipeline(pipeline, registry) -> (Resolved, diagnostics)` checks settings,
stages (kind, placement, parameters: unknown, missing, ill-typed, out of range,
wrong unit, duplicates) and edges (undefined stages, conditions), collecting every
problem. `Resolved` holds the effective values (kind default -> mode preset ->
file, durations in seconds, sizes in bytes) that graph.py turns into a DiGraph and
checks as a graph (cycles, reachability, ports).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from stages.fields import ParamError, check_prompt_lookup
from stages.registry import (BOOL, DURATION, ENUM, FLOAT, FROM_MODE, INT, LIST_STR, MAP, RESOURCES, SIZE, STR,
                             Param, Registry, StageKind, default_registry)

from . import ast, modes, units
from .diagnostics import ERROR, WARNING, Diagnostic, SourcePos, Suggestions, closest, did_you_mean, one_of
from .parser import is_name, quote

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")   # the devices the engine runs on

# pipeline settings, declared like stage parameters
SETTINGS: tuple[Param, ...] = (
    Param("model", STR, None, "the embedded model's name (smollm2-135m-instruct), a .gguf file or an HF folder"),
    Param("mode", ENUM, modes.DEFAULT_MODE, "preset of stage settings", choices=modes.MODES),
    Param("device", STR, "auto", "auto | cpu | cuda | cuda:N"),
    Param("threads", INT, None, "CPU threads for torch (default: torch's choice)", min=1, max=1024, optional=True),
    Param("dtype", ENUM, "auto", "weights and compute precision of the generate stages (auto = on CUDA the "
          "checkpoint's dtype as vLLM takes it, float32 downcast to bf16 or fp16; on a CPU bf16 where fast, else "
          "fp32; int8 = weight-only int8); a stage's own dtype wins",
          choices=("auto", "fp32", "bf16", "fp16", "int8")),
    Param("kv_budget", SIZE, None, "memory of all KV pools together (default: the mode's budget per "
          "engine); kv_lookup stages without their own budget share what is left", min=1 << 16,
          max=1 << 40, optional=True),
)
SETTING_BY_NAME = {p.name: p for p in SETTINGS}
EMBEDDED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ResolvedStage:
    name: str
    kind: StageKind | None               # None when the kind is unknown (already reported)
    params: dict = field(hash=False)
    pos: SourcePos
    placement: str | None
    given: frozenset = frozenset()       # parameters the file sets (the rest: mode, pipeline, default)
    param_pos: dict = field(default_factory=dict, hash=False, compare=False)  # name -> value's SourcePos


@dataclass(frozen=True)
class ResolvedEdge:
    src: str
    dst: str
    condition: tuple | None              # compiled (pipeline_dsl.conditions); None: unconditional
    pos: SourcePos
    cond: Any = field(default=None, compare=False, hash=False)   # the AST condition, for positions


@dataclass(frozen=True)
class Resolved:
    """A pipeline with names resolved and values normalised; input to graph.py."""

    name: str
    pos: SourcePos
    settings: dict = field(hash=False)
    stages: dict = field(hash=False)     # name -> ResolvedStage, in file order
    edges: tuple[ResolvedEdge, ...] = ()
    complete: bool = True                # False when an edge was dropped (undefined stage, bad condition)
    given_settings: frozenset = frozenset()
    setting_pos: dict = field(default_factory=dict, hash=False, compare=False)
    refused_conditions: frozenset = frozenset()   # stages with a conditional out-edge refused by an error
    base: str | None = None              # the base a derived pipeline (`pipeline short : chat`) copies


def _err(msg, pos, expected=None, hint=None, notes=()):
    return Diagnostic(ERROR, msg, pos, expected=expected, hint=hint, notes=tuple(notes))


def _warn(msg, pos, expected=None, hint=None, notes=()):
    return Diagnostic(WARNING, msg, pos, expected=expected, hint=hint, notes=tuple(notes))


def show(v: ast.Value) -> str:
    """A value as written (for messages)."""
    from .fmt import format_value
    return format_value(v)


def _type_expected(p: Param) -> str:
    if p.type == INT:
        return "an integer" + _range_text(p)
    if p.type == FLOAT:
        return "a number" + _range_text(p)
    if p.type == BOOL:
        return "true or false"
    if p.type == STR:
        return 'a string in double quotes ("…")'
    if p.type == ENUM:
        return "one of " + " | ".join(p.choices)
    if p.type == DURATION:
        return f"a duration with a unit ({units.UNIT_NAMES[units.DURATION]}){_range_text(p)}, e.g. 1ms"
    if p.type == SIZE:
        return f"a size with a unit ({units.UNIT_NAMES[units.SIZE]}){_range_text(p)}, e.g. 256MiB"
    if p.type == LIST_STR:            # a nonblank list's example holds no string of whitespace alone
        return 'a list of strings, e.g. ["END", "Observation:"]' if p.nonblank else \
            'a list of strings, e.g. ["\\n\\n", "END"]'
    if p.type == MAP:
        return MAP_EXPECTED
    return p.type


def _fmt_bound(p: Param, v) -> str:
    if p.type == DURATION:
        return units.format_duration(v)
    if p.type == SIZE:
        return units.format_size(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range_text(p: Param) -> str:
    if p.min is not None and p.min_exclusive:
        above = f" above {_fmt_bound(p, p.min)}"
        return above + (f" up to {_fmt_bound(p, p.max)}" if p.max is not None else "")
    if p.min is not None and p.max is not None:
        return f" from {_fmt_bound(p, p.min)} to {_fmt_bound(p, p.max)}"
    if p.min is not None:
        return f" of at least {_fmt_bound(p, p.min)}"
    if p.max is not None:
        return f" of at most {_fmt_bound(p, p.max)}"
    return ""


def _unit_hint(value: ast.Value, p: Param) -> str:
    """What a bare number given to a duration or size could mean: the two likeliest units that
    put it within the parameter's range (`timeout = 0.5`: 0.5s or 0.5ms), never one guess, since
    a number without its unit means neither more than the other (a timeout in seconds written
    as 0.5ms would time every call out)."""
    likely = ("s", "ms", "us") if p.type == DURATION else ("MiB", "GiB", "KiB", "B")
    fits = [u for u in likely
            if (p.min is None or units.normalise(value.value, u) >= p.min)
            and (p.max is None or units.normalise(value.value, u) <= p.max)][:2]
    if not fits:
        return f"write it with a unit ({units.UNIT_NAMES[p.type]})"
    spelled = " or ".join(f"{show(value)}{u}" for u in fits)
    return f"write it with its unit: {spelled}" + (" (agp does not assume one)" if len(fits) > 1 else "")


# other names of enum values (torch's and numpy's dtype names): 'float16' -> fp16
_ENUM_ALIASES = {"float16": "fp16", "half": "fp16", "f16": "fp16", "float32": "fp32", "float": "fp32",
                 "f32": "fp32", "bfloat16": "bf16", "q8": "int8", "i8": "int8", "q8_0": "int8"}


def convert(value: ast.Value, p: Param, what: str) -> tuple[Any, Diagnostic | None]:
    """(normalised value, None) or (None, the diagnostic) for `value` given to parameter `p`."""
    expected = _type_expected(p)
    bad = lambda msg, hint=None: (None, _err(msg, value.pos, expected, hint))  # noqa: E731
    t = p.type
    if isinstance(value, ast.Quantity) and units.unit_kind(value.unit) is None:
        other = units.respelled(value.number, value.unit, t)
        hint = f"write {other}" if other else did_you_mean(value.unit, units.all_units())
        return bad(f"unknown unit '{value.unit}' in '{show(value)}'", hint)
    if t in (DURATION, SIZE):
        if isinstance(value, ast.Quantity):
            kind = units.unit_kind(value.unit)
            if kind != t:
                return bad(f"wrong unit: {what} is a {t}, but '{show(value)}' is a {kind}")
            out = units.normalise(value.number, value.unit)
            if out < 0:                     # whatever the kind's bounds: no wait or size is negative
                return bad(f"{what} is a {t}, never negative: '{show(value)}'")
        elif isinstance(value, (ast.Int, ast.Float)) and value.value == 0:
            out = 0.0 if t == DURATION else 0
        elif isinstance(value, (ast.Int, ast.Float)):
            return bad(f"missing unit: {what} is a {t}; '{show(value)}' has no unit", _unit_hint(value, p))
        else:
            return bad(f"{what} is a {t}, not {_value_word(value)}")
    elif t == INT:
        if isinstance(value, ast.Int):
            out = value.value
        elif isinstance(value, ast.Float) and float(value.value).is_integer():
            return bad(f"{what} is an integer, not the decimal '{show(value)}'", f"write {int(value.value)}")
        else:
            return bad(f"{what} is an integer, not {_value_word(value)}")
    elif t == FLOAT:
        if isinstance(value, (ast.Int, ast.Float)):
            out = float(value.value)
        else:
            return bad(f"{what} is a number, not {_value_word(value)}")
    elif t == BOOL:
        if isinstance(value, ast.Bool):
            out = value.value
        else:
            hint = None
            if isinstance(value, (ast.Word, ast.Str)) and str(value.value).lower() in ("yes", "on", "true"):
                hint = "write true"
            elif isinstance(value, (ast.Word, ast.Str)) and str(value.value).lower() in ("no", "off", "false"):
                hint = "write false"
            elif isinstance(value, ast.Int) and value.value in (0, 1):
                hint = f"write {'true' if value.value else 'false'}"
            return bad(f"{what} is true or false, not {_value_word(value)}", hint)
    elif t == STR:
        if isinstance(value, ast.Str):
            out = value.value
            if p.max_length is not None and len(out) > p.max_length:
                return bad(f"{what} has {len(out)} characters; at most {p.max_length} are allowed")
        elif isinstance(value, ast.Word):
            return bad(f"{what} is a string, not the word '{value.value}'", f'quote it: "{value.value}"')
        else:
            return bad(f"{what} is a string, not {_value_word(value)}")
    elif t == ENUM:
        if isinstance(value, (ast.Word, ast.Str)):
            if value.value not in p.choices:
                alias = _ENUM_ALIASES.get(str(value.value).lower())
                hint = f"did you mean '{alias}'?" if alias in p.choices else did_you_mean(value.value, p.choices)
                return bad(f"'{value.value}' is not a valid value for {what}", hint)
            out = value.value
        else:
            return bad(f"{what} is one of {' | '.join(p.choices)}, not {_value_word(value)}")
    elif t == LIST_STR:
        if isinstance(value, ast.Str):              # one string is a list of one (as in a request)
            value = ast.List((value,), value.pos)
        if not isinstance(value, ast.List):
            return bad(f"{what} is a list of strings, not {_value_word(value)}")
        for item in value.items:
            if not isinstance(item, ast.Str):
                return None, _err(f"{what} is a list of strings, but it holds {_value_word(item)}", item.pos,
                                  expected)
            if p.max_length is not None and len(item.value) > p.max_length:
                return None, _err(f"a string of {len(item.value)} characters in {what}; each may have at most "
                                  f"{p.max_length}", item.pos, expected)
            if item.value == "":
                return None, _err(f"an empty string in {what}", item.pos, expected, "remove it")
            if p.nonblank and not item.value.strip():
                return None, _err(f"a string of whitespace alone in {what}", item.pos, expected, "remove it")
        if p.max_items is not None and len(value.items) > p.max_items:
            return None, _err(f"{what} holds {len(value.items)} strings; at most {p.max_items} are allowed",
                              value.pos, expected)
        total = sum(len(item.value) for item in value.items)
        if p.max_total is not None and total > p.max_total:
            return None, _err(f"{what} holds {total} characters in all; at most {p.max_total} are allowed",
                              value.pos, expected)
        out = [item.value for item in value.items]
    elif t == MAP:
        return _map_value(value, what, expected)
    else:                                   # a third-party type we do not know: pass the raw value
        out = _raw(value)
    return _check_range(out, p, what, value)


def _check_range(out, p: Param, what: str, value: ast.Value):
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if not p.in_range(out):
            too_low = p.min is not None and out <= p.min
            if too_low and p.min_exclusive:
                hint = f"the value must be above {_fmt_bound(p, p.min)}"
            else:
                hint = (f"the {'smallest' if too_low else 'largest'} allowed value is "
                        f"{_fmt_bound(p, p.min if too_low else p.max)}")
            return None, _err(f"value out of range: {what} = {show(value)}", value.pos,
                              _type_expected(p), hint)
    return out, None


MAP_EXPECTED = 'a map of names to values, e.g. {top_k = 3, label = "math"} (strings, numbers, true/false, lists)'


def _map_value(value: ast.Value, what: str, expected: str) -> tuple[dict | None, Diagnostic | None]:
    """A map's dict of plain JSON values ({top_k = 3, label = "math"}), or the error at the entry
    at fault: a name given twice, a value that is no JSON literal (a bare word, a quantity)."""
    if not isinstance(value, ast.Map):
        return None, _err(f"{what} is a map ({{name = value, …}}), not {_value_word(value)}", value.pos, expected)
    out: dict[str, Any] = {}
    first: dict[str, ast.Param] = {}
    for e in value.entries:
        name = e.name.text
        if name in first:
            return None, _err(f"'{name}' is given twice in {what}", e.name.pos, expected,
                              notes=[("first given here", first[name].name.pos)])
        first[name] = e
        got, d = _json_value(e.value, f"'{name}' in {what}")
        if d is not None:
            return None, d
        out[name] = got
    return out, None


def _json_value(v: ast.Value, what: str) -> tuple[Any, Diagnostic | None]:
    """A map entry's value as plain JSON: strings, numbers, booleans and lists of them. A bare word
    or a quantity is no JSON value (the function would get a string or a number nobody wrote)."""
    expected = "a string, a number, true/false or a list of them"
    if isinstance(v, (ast.Int, ast.Float, ast.Bool, ast.Str)):
        return v.value, None
    if isinstance(v, ast.List):
        items = []
        for item in v.items:
            got, d = _json_value(item, what)
            if d is not None:
                return None, d
            items.append(got)
        return items, None
    if isinstance(v, ast.Word):
        key = what.partition("'")[2].partition("'")[0]
        hint = (f"a map holds no null: leave {key} out and give its parameter a default of None"
                if v.value.lower() in ("null", "none", "nil")
                else f"write {v.value.lower()} (lower case)" if v.value.lower() in ("true", "false")
                else f"quote it: {quote(v.value)}")
        return None, _err(f"{what} is the bare word '{v.value}'; a map holds strings, numbers, true/false "
                          "and lists", v.pos, expected, hint)
    return None, _err(f"{what} is {_value_word(v)}; a map holds strings, numbers, true/false and lists",
                      v.pos, expected, f"write a number or a string: {quote(show(v))}")


def _value_word(v: ast.Value) -> str:
    if isinstance(v, ast.Quantity):
        kind = units.unit_kind(v.unit) or "quantity"
        return f"the {kind} '{show(v)}'"
    names = {ast.Int: "the integer", ast.Float: "the number", ast.Bool: "the boolean", ast.Str: "the string",
             ast.Word: "the word", ast.List: "the list", ast.Map: "the map"}
    return f"{names[type(v)]} {show(v)}" if isinstance(v, ast.Str) else f"{names[type(v)]} '{show(v)}'"


def _raw(v: ast.Value):
    if isinstance(v, ast.List):
        return [_raw(i) for i in v.items]
    if isinstance(v, ast.Map):
        return {e.name.text: _raw(e.value) for e in v.entries}
    if isinstance(v, ast.Quantity):
        return units.normalise(v.number, v.unit) if units.unit_kind(v.unit) else f"{v.number}{v.unit}"
    return v.value


# ---------------------------------------------------------------- settings

_MODEL_EXPECTED = (f'"{EMBEDDED_MODEL}" (the embedded model), a .gguf file or a Hugging Face folder (a relative '
                   "path is looked up beside this file, then in the working directory)")


def _model_location(model: str, pos: SourcePos) -> tuple[str, Diagnostic | None]:
    """The embedded model's name as is; a path found beside the .agp file or from the
    working directory, made absolute, once its header checks out (model_files: no weights
    read); anything else an error at the setting."""
    if model.strip().lower() == EMBEDDED_MODEL:
        return model, None
    here = os.path.dirname(os.path.abspath(pos.file)) if pos.file and not pos.file.startswith("<") else None
    why = None
    for base in ([here] if here else []) + [os.getcwd()]:
        candidate = os.path.join(base, os.path.expanduser(model))
        if os.path.isfile(candidate) and candidate.lower().endswith(".gguf") or \
                os.path.isfile(os.path.join(candidate, "config.json")):
            return _checked_model(model, os.path.abspath(candidate), pos)
        if why is None and model.strip() and os.path.isfile(candidate):
            why = f"'{model}' is not a .gguf file"
        elif why is None and model.strip() and os.path.isdir(candidate):
            why = f"the folder '{model}' has no config.json"
    what = why or f"'{model}'"
    return model, _err(f"model not found: {what}", pos, expected=_MODEL_EXPECTED,
                       hint=(why is None and _hub_hint(model)) or did_you_mean(model, (EMBEDDED_MODEL,))
                       or _embedded_prefix_hint(model))


def _embedded_prefix_hint(model: str) -> str | None:
    """`model = "smollm2"`: the embedded model's name cut short, too far from it for a did-you-mean."""
    short = model.strip().lower()
    return f"did you mean '{EMBEDDED_MODEL}' (the embedded model)?" \
        if len(short) >= 4 and EMBEDDED_MODEL.startswith(short) else None


def _hub_hint(model: str) -> str | None:
    """What to write for a Hugging Face hub id (`org/name`, as vLLM takes a model), which agp
    never downloads: the embedded model's own name, or a folder the user downloads it to."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", model.strip()) or model.lower().endswith(".gguf"):
        return None
    if model.strip().rsplit("/", 1)[1].lower() == EMBEDDED_MODEL:
        return f'a Hugging Face hub id; this model is the embedded one: model = "{EMBEDDED_MODEL}"'
    return (f"a Hugging Face hub id? agp downloads nothing: download it (huggingface-cli download {model.strip()} "
            "--local-dir DIR) and name that folder, or a .gguf file")


def _checked_model(model: str, path: str, pos: SourcePos) -> tuple[str, Diagnostic | None]:
    e = _model_problem(path, _stamp(path))
    if e is not None:
        shown = model if os.path.abspath(e.path) == path else \
            os.path.join(model, os.path.relpath(e.path, path))     # the file inside the folder
        kind = "folder" if os.path.isdir(path) and shown == model else "file"
        return model, _err(f"bad model {kind} '{shown}': {e.problem}", pos,
                           expected="a llama-family .gguf file (GGUF version 2 or 3), or a Hugging Face "
                                    "folder with config.json, *.safetensors and tokenizer.json")
    return path, None


def _stamp(path: str) -> tuple:
    """(name, mtime, size) of the file, or of each file in the folder: the cache key."""
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        out.append((f, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=16)
def _model_problem(path: str, stamp: tuple):
    """The ModelFileProblem of a model file or folder, or None (checked once per stamp: a
    pipeline names its model in several places and is checked more than once)."""
    from .model_files import ModelFileProblem, check_model_path

    try:
        check_model_path(path)
    except ModelFileProblem as e:
        return e
    return None


def check_settings(p: ast.Pipeline) -> tuple[dict, list[Diagnostic]]:
    """(settings with defaults, diagnostics); settings["_given"] lists those the file sets."""
    diags: list[Diagnostic] = []
    seen: dict[str, ast.Setting] = {}
    values: dict[str, Any] = {}
    for s in p.settings:
        name = s.name.text
        if name in seen:
            diags.append(_err(f"duplicate setting '{name}'", s.name.pos,
                              notes=[("first set here", seen[name].name.pos)]))
            continue
        seen[name] = s
        param = SETTING_BY_NAME.get(name)
        if param is None:
            hint = SETTINGS_ELSEWHERE.get(name) or did_you_mean(name, SETTING_BY_NAME)
            if hint is None and name in _all_param_names():
                hint = f"'{name}' is a stage parameter: set it inside the stage's {{ … }}"
            diags.append(_err(f"unknown setting '{name}'", s.name.pos,
                              expected="a pipeline setting: " + one_of(SETTING_BY_NAME), hint=hint))
            continue
        if name == "device":
            out, d = check_device(s.value)
        else:
            out, d = convert(s.value, param, f"setting '{name}'")
        if d is None and name == "model":
            out, d = _model_location(out, s.value.pos)
        if d:
            diags.append(d)
        else:
            values[name] = out
    settings = {q.name: q.default for q in SETTINGS}
    settings.update(values)
    settings["_given"] = {name: seen[name].value.pos for name in values}
    device = settings.get("device", "auto")
    if "threads" in seen and str(device).startswith("cuda"):
        diags.append(_warn(f"setting 'threads' is unused: the device is {device}", seen["threads"].name.pos,
                           hint="threads only apply when the pipeline runs on the CPU"))
    return settings, diags


DEVICE_EXPECTED = "auto | cpu | cuda | cuda:N"
# what else people write for a GPU: only CUDA devices are served
_GPU_WORDS = ("gpu", "nvidia", "cuda", "device", "dev")


def check_device(value: ast.Value) -> tuple[str | None, Diagnostic | None]:
    """A device: the word or string auto, cpu, cuda or cuda:N (the pipeline's `device` setting
    and generate's `device` parameter take the same spellings)."""
    if isinstance(value, (ast.Word, ast.Str)):
        if DEVICE_RE.match(value.value):
            return value.value, None
        return None, _err(f"'{value.value}' is not a device", value.pos, expected=DEVICE_EXPECTED,
                          hint=_device_hint(value.value))
    hint = f"did you mean 'cuda:{value.value}'?" if isinstance(value, ast.Int) and value.value >= 0 else None
    return None, _err(f"'{show(value)}' is not a device", value.pos, expected=DEVICE_EXPECTED, hint=hint)


def _device_hint(text: str) -> str | None:
    """'gpu' -> cuda, 'cuda0' / 'GPU:1' / 'cuda: 1' -> cuda:N, 'CPU' -> cpu, else the closest name."""
    t = re.sub(r"\s+", "", text.lower())
    m = re.fullmatch(r"(?:%s)[-_:./]?(\d+)" % "|".join(_GPU_WORDS), t)
    if m:
        return f"did you mean 'cuda:{int(m.group(1))}'?"
    if t in _GPU_WORDS[:3]:
        return "did you mean 'cuda'?"
    if t.split(":")[0] in ("mps", "xpu", "rocm", "hip", "tpu", "metal", "vulkan", "npu"):
        return "agp runs models on the CPU or on CUDA GPUs (ROCm builds of torch call theirs cuda too)"
    if DEVICE_RE.match(t):
        return f"did you mean '{t}'?"
    return did_you_mean(text, ("auto", "cpu", "cuda"))


def _all_param_names() -> set[str]:
    return {p.name for k in default_registry().kinds() for p in k.params}


# ---------------------------------------------------------------- stages

# pipeline settings other servers have (llama.cpp's, Ollama's) that agp sets elsewhere
_CONTEXT = ("the context is the model's, or agp serve --max-model-len N; the KV cache's size is kv_budget = …")
SETTINGS_ELSEWHERE = {"n_ctx": _CONTEXT, "ctx_size": _CONTEXT, "num_ctx": _CONTEXT, "context_length": _CONTEXT,
                      "n_gpu_layers": "the whole model runs on the pipeline's device: device = cuda"}

# parameters earlier versions had: what to write instead
RETIRED = {
    ("respond", "stream"): "remove it: each request chooses streaming itself (\"stream\": true in agp serve)",
    ("generate", "precision"): "it is called dtype now: dtype = …",
}

# parameters other servers and languages give a stage that agp spells otherwise or sets per request
_GUIDED = ("a generate stage constrains its answers by a json_schema file; {what} is a request's "
           "{field}, which a python stage before the batcher may set (item[\"{field}\"] = …)")
ELSEWHERE = {
    ("generate", "regex"): _GUIDED.format(what="a regular expression", field="guided_regex"),
    ("generate", "choice"): _GUIDED.format(what="a list of choices", field="guided_choice"),
    ("generate", "choices"): _GUIDED.format(what="a list of choices", field="guided_choice"),
    ("generate", "grammar"): _GUIDED.format(what="a grammar", field="guided_grammar"),
    # llama.cpp's and Ollama's names of a generation's settings
    ("generate", "n_predict"): "llama.cpp's name: the answer's length is max_new_tokens = …",
    ("generate", "num_predict"): "Ollama's name: the answer's length is max_new_tokens = …",
    ("generate", "temp"): "llama.cpp's name: temperature = …",
    ("generate", "repeat_penalty"): "llama.cpp's and Ollama's name: repetition_penalty = … (over the whole prompt "
                                    "and answer)",
    # map-reduce's words on the join that collects, not the python stage that splits
    ("join", "returns"): "returns = many belongs on the python stage whose function returns the list; "
                         "the join collects its items as they come, with no setting",
    ("join", "max_items"): "max_items bounds a returns = many python stage's list: set it on that stage",
    ("dynamic_batch", "max_queue_delay"): "how long a batch waits for more requests is timeout: timeout = 100us",
    ("dynamic_batch", "max_queue_delay_microseconds"): "how long a batch waits for more requests is timeout: "
                                                        "timeout = 100us",
}


# another name of a value (join's `policy = vote`: the self-consistency vote is majority)
_VALUE_NAMES = {("join", "policy", "vote"): "majority", ("join", "policy", "consensus"): "majority"}


def _sibling_value(kind: StageKind, schema: Param, value: ast.Value, d: Diagnostic) -> Diagnostic:
    """An enum value refused by one parameter that is a value of another of the same kind
    (dynamic_batch's `policy = priority`, meant for scheduling_policy): the hint names that one."""
    word = getattr(value, "value", None)
    meant = _VALUE_NAMES.get((kind.name, schema.name, word)) if isinstance(word, str) else None
    if meant is not None and d.hint is None:
        return replace(d, hint=f"write {schema.name} = {meant} (the answer most branches agree on)")
    owner = next((q.name for q in kind.params if q is not schema and q.type == ENUM and word in q.choices), None)
    if owner is None:
        return d
    return replace(d, hint=f"'{word}' is a value of {owner}: write {owner} = {word}")


# names a required parameter is often written under: `system_prompt { prompt = "…" }`, `python { function = … }`
_PARAM_ALIASES = {"prompt": "text", "content": "text", "message": "text", "system": "text",
                  "function": "fn", "func": "fn", "callable": "fn"}


def _meant_for(prm: ast.Param, hint: str | None, schema) -> bool:
    """Whether an unknown parameter is surely the missing required `schema` under another name: its
    name close to it (the did-you-mean closeness) or a name it is known by (prompt for text), and
    its value one the parameter takes. `python { concurrency = 4 }` is no `fn`."""
    name = prm.name.text
    if hint not in (None, f"did you mean '{schema.name}'?"):
        return False                               # a hint of its own (a setting's name, a retired one)
    if closest(name, [schema.name]) is None and _PARAM_ALIASES.get(name) != schema.name:
        return False
    if schema.inherits == "device":
        return not check_device(prm.value)[1]
    return not convert(prm.value, schema, f"'{schema.name}'")[1]


def resolve_params(kind: StageKind, stage: ast.Stage, mode: str,
                   settings: dict | None = None) -> tuple[dict, list[Diagnostic]]:
    """Effective parameter values: kind default -> mode preset -> the pipeline's setting of the
    same name (for parameters that inherit one, when the file sets it) -> the stage's own value."""
    diags: list[Diagnostic] = []
    given: dict[str, ast.Param] = {}
    params: dict[str, Any] = {}
    unknown: list[tuple[int, str | None, ast.Param]] = []   # (where in diags, its hint, it) of each unknown one
    missing: list = []
    for prm in stage.params:
        name = prm.name.text
        if name in given:
            diags.append(_err(f"duplicate parameter '{name}' in stage '{stage.name.text}'", prm.name.pos,
                              notes=[("first set here", given[name].name.pos)]))
            continue
        given[name] = prm
        schema = kind.param(name)
        if schema is None:
            names = [q.name for q in kind.params]
            hint = did_you_mean(name, names)
            if hint is None and name in SETTING_BY_NAME:
                hint = f"'{name}' is a pipeline setting: set it outside the stages"
            hint = RETIRED.get((kind.name, name), ELSEWHERE.get((kind.name, name), hint))
            unknown.append((len(diags), hint, prm))
            diags.append(_err(f"unknown parameter '{name}' for stage kind '{kind.name}'", prm.name.pos,
                              expected=f"a parameter of {kind.name}: " + one_of(names), hint=hint))
            continue
        if schema.inherits == "device":        # generate's device: the setting's words and checks
            out, d = check_device(prm.value)
        else:
            out, d = convert(prm.value, schema, f"'{name}'")
        if d and schema.type == ENUM:
            d = _sibling_value(kind, schema, prm.value, d)
        if d:
            diags.append(d)
        else:
            params[name] = out
    inherited = (settings or {}).get("_given", {})
    for schema in kind.params:
        if schema.name in given:
            continue
        if schema.inherits and schema.inherits in inherited:
            params[schema.name] = settings[schema.inherits]
            continue
        has, value = modes.preset(mode, kind.name, schema.name)
        if has:
            params[schema.name] = value
        elif schema.required:
            missing.append(schema)
        elif schema.default is FROM_MODE:
            params[schema.name] = modes.preset(modes.DEFAULT_MODE, kind.name, schema.name)[1]
        else:
            d = schema.default
            params[schema.name] = list(d) if isinstance(d, tuple) else d
    if len(missing) == 1 and len(unknown) == 1 and _meant_for(unknown[0][2], unknown[0][1], missing[0]):
        # `system_prompt { prompt = "…" }`: one slip, the required parameter under another name
        i, schema = unknown[0][0], missing[0]
        diags[i] = replace(diags[i], hint=f"did you mean '{schema.name}'? {kind.name} needs it, and this stage "
                                          "does not set it")
        return params, diags
    for schema in missing:
        diags.append(_err(f"missing parameter '{schema.name}' in stage '{stage.name.text}' ({kind.name})",
                          stage.name.pos, expected=f"{schema.name} = {_type_expected(schema)}",
                          hint=schema.doc or None))
    return params, diags


def check_pipeline(p: ast.Pipeline, registry: Registry | None = None,
                   allowed: tuple[str, ...] | None = None) -> tuple[Resolved, list[Diagnostic]]:
    """Check one pipeline's settings, stages and edges; collect every diagnostic. `allowed`: the
    folders its files may name (loader.Program.allowed; default: the pipeline file's folder)."""
    from .loader import allowed_folders

    registry = registry or default_registry()
    if allowed is None:
        allowed = allowed_folders(p.pos.file if p.pos is not None else "<string>")
    settings, diags = check_settings(p)
    given_settings = settings.pop("_given")
    mode = settings.get("mode", modes.DEFAULT_MODE)
    stages: dict[str, ResolvedStage] = {}
    for st in p.stages:
        name = st.name.text
        if name in stages:
            diags.append(_err(f"duplicate stage '{name}'", st.name.pos,
                              notes=[("first defined here", stages[name].pos)],
                              hint="give each stage its own name"))
            continue
        kind = registry.get(st.kind.text)
        params: dict = {}
        given: set[str] = set()
        param_pos: dict = {}
        if kind is None:
            diags.append(_err(f"unknown stage kind '{st.kind.text}'", st.kind.pos,
                              expected="a stage kind: " + one_of(registry.names()),
                              hint=did_you_mean(st.kind.text, registry.names()),
                              notes=[(problem, None) for problem in registry.problems]))
        else:
            if kind.name in registry.shadowed:
                which = "the built-in kind" if kind.source == "builtin" else f"the kind of {kind.source}"
                diags.append(_warn(f"'{kind.name}' here is {which}: {registry.shadowed[kind.name]}",
                                   st.kind.pos, hint="give the plug-in's kind a name of its own"))
            params, ds = resolve_params(kind, st, mode, {**settings, "_given": given_settings})
            diags += ds
            diags += _check_impl(kind, st.kind.pos)
            param_pos = {prm.name.text: prm.value.pos for prm in st.params}
            given = {n for n in param_pos if kind.param(n) is not None}
            diags += _check_kind_params(kind, st, params, given, param_pos, allowed)
        placement = None
        if st.placement is not None:
            if st.placement.text in RESOURCES:
                placement = st.placement.text
            else:
                diags.append(_err(f"unknown placement '{st.placement.text}'", st.placement.pos,
                                  expected="on " + " | ".join(RESOURCES),
                                  hint=did_you_mean(st.placement.text, RESOURCES)))
        stages[name] = ResolvedStage(name, kind, params, st.name.pos, placement, frozenset(given), param_pos)
    edges, ds, refused = _check_edges(p, stages)
    diags += ds + _check_python_labels(edges, stages)
    dropped = any(d.is_error for d in ds)
    return Resolved(p.name.text, p.name.pos, settings, stages, tuple(edges), complete=not dropped,
                    given_settings=frozenset(given_settings), setting_pos=dict(given_settings),
                    refused_conditions=frozenset(refused),
                    base=p.base.text if p.base is not None else None), diags


# ---------------------------------------------------------------- kind-specific checks

def _check_impl(kind: StageKind, pos: SourcePos) -> list[Diagnostic]:
    """A kind needs a runtime implementation; a plug-in's `impl` must name something its module
    defines, found by reading the source as a `fn` is (nothing imported; a compiled module cannot
    be read, and is left to the run)."""
    from .userfn import FunctionNotFound, NoSource, function_info

    expected = "a kind whose registry entry names its impl (\"module:Class\" with a process(item) method)"
    hint = "see docs/architecture.md, 'Stage implementations'"
    if not kind.impl:
        return [_err(f"stage kind '{kind.name}' ({kind.source}) has no runtime implementation", pos,
                     expected=expected, hint=hint)]
    if kind.source == "builtin":
        return []
    try:
        function_info(kind.impl, None)
    except NoSource:
        return []
    except FunctionNotFound as e:
        return [_err(f"stage kind '{kind.name}' ({kind.source}) cannot load its implementation "
                     f"{kind.impl!r}: {e}", pos, expected=expected, hint=hint)]
    return []


def _check_signature(what: str, ref: str, n: int, call: str, pos: SourcePos, base,
                     args: ast.Map | None = None) -> list[Diagnostic]:
    """What the source says of how `ref` is called with `n` positional arguments (docs: a python
    stage's function gets the item, a stream's the item and its chunks, a join's the results)
    and the stage's `args` as keywords: a def whose parameters cannot take them is an error (a
    keyword at its name in the map); a class a warning (calling it makes an instance, not the
    dict or label the stage returns). Nothing is imported."""
    import ast as pyast

    from .userfn import FunctionNotFound, function_info, keyword_call, positional_arity, takes

    try:
        node = function_info(ref, base).node
    except FunctionNotFound:
        return []
    if isinstance(node, pyast.ClassDef):
        return [_warn(f"{what}: {ref} is a class; calling it makes an instance, not the dict or label "
                      "the stage returns", pos, expected=f"a function called as fn{call}",
                      hint="name a function, or a module-level instance whose __call__ takes " + call)]
    targets = node.targets if isinstance(node, pyast.Assign) else [node.target] \
        if isinstance(node, pyast.AnnAssign) else []
    value = node.value if len(targets) == 1 and isinstance(targets[0], pyast.Name) else None
    if isinstance(value, (pyast.Constant, pyast.List, pyast.Dict, pyast.Set, pyast.Tuple, pyast.JoinedStr)):
        shown = type(value.value).__name__ if isinstance(value, pyast.Constant) else \
            "str" if isinstance(value, pyast.JoinedStr) else type(value).__name__.lower()
        return [_err(f"{what}: {ref} is not a function: the module binds it to a value of type {shown} (line {node.lineno})",
                     pos, expected=f"a function called as fn{call}")]
    if isinstance(value, pyast.Lambda):          # `f = lambda a, b: …`: its parameters are in the source too
        node = value
    if args is not None and args.entries:
        bound = keyword_call(node, n, [e.name.text for e in args.entries])
        if bound is None or not bound.too_many:
            return _check_keywords(what, ref, n, call, args, bound, isinstance(node, pyast.Lambda))
    bound = keyword_call(node, n, [])
    kwonly = {p.arg for p in getattr(getattr(node, "args", None), "kwonlyargs", ())}
    if bound is not None and not bound.too_many and bound.missing and set(bound.missing) <= kwonly:
        # the call takes the positional arguments, and only keywords that args alone can give are
        # missing (`def retrieve(item, *, top_k)` on a stage without args, or with `args = {}`)
        at = args.pos if args is not None else pos
        gives = "args = {}" if args is not None else "no args"
        return [_err(f"{what}: {ref} needs '{m}', which neither the call fn{call} nor args gives (the stage "
                     f"has {gives})", at, f"args giving every parameter past {call} that has no default",
                     f"add {m} = … to args" if args is not None else
                     f"write args = {{{m} = …}} in the stage, or give {m} a default") for m in bound.missing]
    if takes(node, n) is False:
        least, most = positional_arity(node)
        if most == 0 and least:
            takes_words = "keyword-only arguments without defaults"
        else:
            takes_words = (f"{least} positional argument{'s' if least != 1 else ''}" if most == least
                           else f"{least} to {'any number of' if most is None else most} positional arguments")
        name = ref.partition(":")[2]
        lam = isinstance(node, pyast.Lambda)
        return [_err(f"{what}: {ref} {'is a lambda that ' if lam else ''}takes {takes_words}, but it is called "
                     f"with {n} ({call[1:-1]})", pos,
                     expected=f"lambda {call[1:-1]}: …" if lam else f"def {name}{call}",
                     hint=f"give {'the lambda' if lam else name} the parameters {call}")]
    return []

def _check_keywords(what: str, ref: str, n: int, call: str, args: ast.Map, bound, lam: bool) -> list[Diagnostic]:
    """The stage's `args` against the def's parameters (`bound`: userfn.KeywordCall; None: the source
    does not say): a keyword no parameter takes, one the call's positional arguments fill, one of a
    positional-only parameter, each an error at its name; a parameter without a default that
    neither fills, an error at the map; a value its parameter's annotation clearly refuses
    (`top_k: int` given "3"), a warning at the value."""
    import ast as pyast

    from .userfn import annotation_takes

    if bound is None:
        return []
    diags: list[Diagnostic] = []
    entry = {e.name.text: e for e in args.entries}
    name = "the lambda" if lam else ref.partition(":")[2]
    takes_words = ", ".join(bound.names) if bound.names else "none"
    passed = " or ".join(bound.passed)
    expected = f"any keyword but {passed} ({name} takes **kwargs)" if bound.any_keyword and passed else \
        f"any keyword ({name} takes **kwargs)" if bound.any_keyword else \
        f"a keyword {name} takes: {takes_words}" if bound.names else \
        f"no args: {name} takes no parameter past {call}"
    meant = Suggestions(bound.names)
    for k in bound.unknown:
        hint = meant.hint(k) or f"give {name} a parameter {k} (or **kwargs), or remove {k} from args"
        diags.append(_err(f"{what}: {ref} has no parameter '{k}'", entry[k].name.pos, expected, hint))
    misspelt = {meant.closest(k) for k in bound.unknown}       # `sufix = 1` for suffix: said at sufix
    for k in bound.twice:
        diags.append(_err(f"{what}: '{k}' is filled by the call fn{call} itself, so args cannot give it too",
                          entry[k].name.pos, expected,
                          "give the value another name, in args and in the def"))
    for k in bound.positional_only:
        diags.append(_err(f"{what}: {ref}'s parameter '{k}' is positional-only (before its /), so args "
                          "cannot give it by name", entry[k].name.pos, expected,
                          f"move {k} after the / in the def"))
    for m in (m for m in bound.missing if m not in misspelt):
        diags.append(_err(f"{what}: {ref} needs '{m}', which neither the call fn{call} nor args gives",
                          args.pos, f"args giving every parameter past {call} that has no default",
                          f"add {m} = … to args, or give {m} a default"))
    json_type = {ast.Str: "str", ast.Bool: "bool", ast.Int: "int", ast.Float: "float", ast.List: "list"}
    for k, note in bound.annotations.items():
        took = annotation_takes(note)
        value = entry[k].value
        if took is not None and json_type.get(type(value)) not in took:
            shown = pyast.unparse(note)
            diags.append(_warn(f"{what}: '{k}' is annotated {shown} in {ref}, but args gives it {_value_word(value)}",
                               value.pos, f"a value of type {shown}"))
    return diags


def _check_python_returns(name: str, ref: str, pos: SourcePos, base) -> list[Diagnostic]:
    """A `return` whose literal is no dict, label or None (`return item, "math"`, `return 42`)
    fails its request whenever it is reached: an error at the `fn` value, naming the line."""
    from .userfn import FunctionNotFound, function_info, wrong_returns

    try:
        bad = wrong_returns(function_info(ref, base))
    except FunctionNotFound:
        return []
    if not bad:
        return []
    line, what = bad[0]
    more = f" (and {len(bad) - 1} more return{'s' if len(bad) > 2 else ''} like it)" if len(bad) > 1 else ""
    return [_err(f"stage '{name}': {ref} returns {what} at line {line}{more}; a python stage's function "
                 "returns the item's dict, a label string or None", pos,
                 expected="return item (changed or new), return \"LABEL\" for `when LABEL` edges, or return None",
                 hint="return the item or a label, not both: a value a later stage needs goes into the item "
                      "(its metadata, say) and the label is returned alone" if what == "a tuple" else
                     "a list of requests, each an item of its own, is returns = many" if what == "a list" else None)]


def _check_many_returns(name: str, ref: str, pos: SourcePos, base) -> list[Diagnostic]:
    """A `returns = many` stage's `return` whose literal is no list (a dict, a label, None)
    fails its request whenever it is reached: an error at the `fn` value, naming the line."""
    from .userfn import FunctionNotFound, function_info, runs_off_end, wrong_many_returns

    try:
        info = function_info(ref, base)
    except FunctionNotFound:
        return []
    bad = wrong_many_returns(info)
    if not bad:
        line = runs_off_end(info)
        if line is None:
            return []
        return [_warn(f"stage '{name}': {ref} can run off its end after line {line}, which returns None, but the "
                      "stage says returns = many: that request fails there", pos,
                      expected="a return of a list on every path", hint="return [] when there is nothing to fan out")]
    line, what = bad[0]
    more = f" (and {len(bad) - 1} more return{'s' if len(bad) > 2 else ''} like it)" if len(bad) > 1 else ""
    return [_err(f"stage '{name}': {ref} returns {what} at line {line}{more}, but the stage says returns = many: "
                 "its function returns a list of requests (an empty one for none)", pos,
                 expected='return [{"prompt": …}, …] (or [] when there is nothing to fan out)',
                 hint="return [request] for one request" if what == "a dict" else
                      "return [] when there is nothing to fan out" if what == "None" else None)]


def _check_python_shape(name: str, params: dict, given: set, where, base) -> list[Diagnostic]:
    """A generator function only as a stream filter, a stream filter only as a generator, and
    none of what a stream cannot do (take chunks back to retry, cache, loop, turn into a request)."""
    from .userfn import function_shape

    fn, stream = params["fn"], bool(params.get("stream"))
    shape = function_shape(fn, base)
    yields = shape in ("generator", "async_generator")
    if yields and not stream and params.get("returns") == "many":
        return [_err(f"stage '{name}': {fn} is a generator function, but a returns = many stage's function "
                     "returns a list of requests", where("fn"),
                     expected="a function that returns a list (def or async def)",
                     hint="build the list and return it instead of yielding each request")]
    if yields and not stream:
        return [_err(f"stage '{name}': {fn} is a generator function, but a python stage calls its "
                     "function once per item for a dict, a label or None", where("fn"),
                     expected="a function that returns (def or async def), or stream = true",
                     hint="write stream = true to filter generated text chunk by chunk, or return the item")]
    if not stream:
        return []
    diags = []
    if shape in ("function", "coroutine"):
        diags.append(_err(f"stage '{name}' has stream = true, but {fn} does not yield", where("stream"),
                          expected="a generator: def f(item, chunks): for text in chunks: yield text",
                          hint="make the function yield the text it lets through, or remove stream = true"))
    for param, bad in (("retries", params.get("retries")), ("cache", params.get("cache")),
                       ("max_turns", params.get("max_turns"))):
        if param in given and bad:
            diags.append(_err(f"stage '{name}': {param} cannot be used with stream = true", where(param),
                              expected="a stream stage without retries, cache or max_turns",
                              hint="chunks already sent cannot be taken back: remove "
                                   f"{param} or stream = true"))
    if params.get("returns") in ("request", "any", "many"):
        diags.append(_err(f"stage '{name}' has stream = true, so it gives Generated results, not "
                          f"returns = {params['returns']}", where("returns"),
                          expected="returns = same (or generated) with stream = true"))
    return diags


def _args_map(st: ast.Stage, params: dict) -> ast.Map | None:
    """The map a stage's `args` is written as (its entries' positions), once it checked out (`{}` too:
    a keyword the function needs is then said at it)."""
    if params.get("args") is None:
        return None
    return next((p.value for p in st.params if p.name.text == "args" and isinstance(p.value, ast.Map)), None)


def _check_many_params(name: str, params: dict, given: set, where) -> list[Diagnostic]:
    """`max_items` bounds the list of a `returns = many` stage, and nothing else; a cache keeps one
    item per call, not a list."""
    many = params.get("returns") == "many"
    if "max_items" in given and not many:
        return [_warn(f"stage '{name}' sets max_items but not returns = many: its function returns one item, "
                      "so max_items bounds nothing", where("max_items"),
                      hint="remove max_items, or write returns = many if the function returns a list of requests")]
    if many and "cache" in given and params.get("cache"):
        return [_err(f"stage '{name}': cache cannot be used with returns = many", where("cache"),
                     expected="a returns = many stage without cache",
                     hint="a result cache keeps one item per call; remove cache (or cache inside the function)")]
    return []


def _sets_other_than_default(kind: StageKind, name: str, params: dict, given: set) -> bool:
    """Whether the stage writes `name` with a value other than its kind's default. Writing the default
    changes nothing, and it is how a derived pipeline takes back what its base set (`t.cache = 0
    t.cache_ttl = 0` over a base with `cache = 4  cache_ttl = 50ms`): no setting is left to warn of."""
    if name not in given:
        return False
    spec = kind.param(name)
    return spec is None or spec.default is None or params.get(name) != spec.default


def _check_idle_params(kind: StageKind, what: str, params: dict, given: set, where) -> list[Diagnostic]:
    """Settings that only tune another one: `cache_ttl` ages out the entries of `cache`, `backoff`
    spaces the tries of `retries`; written while that other is off (0, its default), they do nothing
    (written as their own default, they change nothing either way: no warning)."""
    diags = []
    for param, needs in (("cache_ttl", "cache"), ("backoff", "retries")):
        if _sets_other_than_default(kind, param, params, given) and not params.get(needs):
            diags.append(_warn(f"{what} sets {param} but {needs} = {params.get(needs) or 0} (off): "
                               f"{param} does nothing without {needs}", where(param),
                               hint=f"add {needs} = N" + (" (how many results to keep)" if needs == "cache"
                                                          else " (how many more tries a transient error gets)")
                                    + f", or remove {param} (a derived pipeline, which cannot remove its "
                                      f"base's, writes it as its default: {param} = "
                                      f"{units.format_duration(kind.param(param).default)})"))
    return diags


def _module_path_hint(module: str, attr: str) -> str:
    """`fn = "lib/hooks.py:f"`: a module is named as Python imports it, not by its file's path."""
    parts = [p for p in re.split(r"[/\\]+", module) if p not in ("", ".")]
    if parts and parts[-1].endswith(".py"):
        parts[-1] = parts[-1][:-3]
    if parts and not os.path.isabs(module) and all(p.isidentifier() and p.isascii() for p in parts):
        return ("a module is named by its dotted name from this file's folder, not by a path: "
                f'write "{".".join(parts)}:{attr}"')
    stem = parts[-1] if parts else module
    return (f"a module is named, not given by a path: put {stem}.py beside this file (or its folder on "
            f'PYTHONPATH) and write "{stem}:{attr}"')


def _check_kind_params(kind: StageKind, st: ast.Stage, params: dict, given: set, pos: dict,
                       allowed: tuple[str, ...]) -> list[Diagnostic]:
    """What one parameter's type and range cannot say: functions that must exist, a model that
    must be found, parameters that go together."""
    from .userfn import FunctionNotFound, find_function, function_shape

    diags: list[Diagnostic] = []
    where = pos.get
    # a path is looked up beside the file that wrote it: a derived pipeline's override beside
    # the derived one's file, a value copied from its base beside the base's
    base = _base_dir(where("fn") or st.name.pos)

    def check_fn(param: str) -> bool:
        ref = params.get(param)
        if ref is None or param not in given:
            return False
        try:
            find_function(ref, base)
        except FunctionNotFound as e:
            hint = None
            module, _, attr = ref.partition(":")
            if e.names:
                hint = did_you_mean(attr, e.names)
            elif attr and ("/" in module or "\\" in module):    # a path where the module's name goes
                hint = _module_path_hint(module, attr)
            elif module.endswith(".py") and attr:     # a file name where the module's name goes
                hint = f'write the module\'s name, without .py: "{module[:-3]}:{attr}"'
            diags.append(_err(f"{e} (stage '{st.name.text}')", where(param),
                              expected='"module:function": a module beside this file or on sys.path '
                                       "and a function in it", hint=hint))
            return False
        return True

    if kind.name == "python":
        if check_fn("fn"):
            shape = _check_python_shape(st.name.text, params, given, where, base)
            diags += shape
            stream = bool(params.get("stream"))
            refused = "args" in given and "args" not in params      # a bad map: said already, at it
            if not any(d.is_error for d in shape) and not refused:   # a generator without stream: said already
                diags += _check_signature(f"stage '{st.name.text}'", params["fn"], 2 if stream else 1,
                                          "(item, chunks)" if stream else "(item)", where("fn"), base,
                                          _args_map(st, params))
            if not stream and params.get("returns") != "many":   # a stream filter's return is a label or
                diags += _check_python_returns(st.name.text, params["fn"], where("fn"), base)   # nothing
            elif not stream and not any(d.is_error for d in shape):
                diags += _check_many_returns(st.name.text, params["fn"], where("fn"), base)
        diags += _check_many_params(st.name.text, params, given, where)
        diags += _check_idle_params(kind, f"stage '{st.name.text}'", params, given, where)
    elif kind.name == "join":
        policy, fn = params.get("policy"), params.get("fn")
        if fn is not None and "policy" not in given:
            params["policy"] = "fn"
        elif fn is not None and policy != "fn":
            diags.append(_err(f"join '{st.name.text}' sets fn but policy = {policy}", where("fn"),
                              hint="write policy = fn, or remove fn"))
        elif policy == "fn" and fn is None:
            diags.append(_err(f"join '{st.name.text}' has policy = fn but no fn", where("policy"),
                              expected='fn = "module:function"'))
        if check_fn("fn") and not ("args" in given and "args" not in params):
            diags += _check_signature(f"join '{st.name.text}'", params["fn"], 1, "(results)", where("fn"), base,
                                      _args_map(st, params))
        if params.get("fn") is None:          # workers, timeout, retries, backoff and args run a join's fn
            for p in ("workers", "timeout", "retries", "backoff", "args"):
                if _sets_other_than_default(kind, p, params, given):
                    diags.append(_warn(f"join '{st.name.text}' sets {p} but has no fn: the built-in "
                                       f"policy {policy or 'first'} runs no user code, so {p} does nothing",
                                       where(p), hint=f"remove {p}, or merge with fn = \"module:function\""))
        else:
            diags += _check_idle_params(kind, f"join '{st.name.text}'", params, given, where)
        if "fn" in given and params.get("fn") and \
                function_shape(params["fn"], base) in ("generator", "async_generator"):
            diags.append(_err(f"join '{st.name.text}': {params['fn']} is a generator function; a join "
                              "function returns one result", where("fn"),
                              expected="a function that returns one of the results, its index or a new dict",
                              hint="return the merged result instead of yielding it"))
    elif kind.name == "generate":
        low, high = params.get("min_tokens"), params.get("max_new_tokens")
        if "min_tokens" in given and isinstance(low, int) and isinstance(high, int) and low > high:
            # vLLM refuses min_tokens > max_tokens; here both are defaults a request may override
            diags.append(_warn(f"min_tokens = {low} is more than max_new_tokens = {high}: an answer that keeps "
                               f"these defaults stops at {high} tokens", where("min_tokens"),
                               hint=f"lower min_tokens to {high} or less, or raise max_new_tokens"))
        low, high = params.get("prompt_lookup_min"), params.get("prompt_lookup_max")
        try:
            if isinstance(low, int) and isinstance(high, int):
                check_prompt_lookup(low, high)
        except ParamError as e:
            at = "prompt_lookup_min" if "prompt_lookup_min" in given else "prompt_lookup_max"
            diags.append(_err(str(e), where(at), expected=f"prompt_lookup_min at most prompt_lookup_max ({high})",
                              hint="lower prompt_lookup_min or raise prompt_lookup_max"))
        spec = [p for p in ("speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
                if _sets_other_than_default(kind, p, params, given)]
        if spec and params.get("speculate", "off") == "off":
            diags.append(_warn(f"generate '{st.name.text}' sets {spec[0]} but speculate = off: it does nothing",
                               where(spec[0]), hint="add speculate = ngram, or remove it"))
        if params.get("speculate", "off") != "off" and "speculate" in given and "json_schema" in given:
            # a grammar's matcher takes one token at a time: its requests never draft (engine/scheduler.py)
            diags.append(_warn(f"generate '{st.name.text}' sets speculate = {params['speculate']} and json_schema: "
                               f"its answers follow the schema's grammar, under which nothing is drafted, so "
                               f"speculation runs only for a request that brings its own free response_format",
                               where("speculate"), hint="remove speculate, or json_schema"))
        model = params.get("model")
        if model is not None and "model" in given:
            params["model"], d = _model_location(model, where("model"))
            if d:
                diags.append(d)
        lora = params.get("lora")
        if lora is not None and "lora" in given:
            params["lora"], d = _lora_folder(lora, _base_dir(where("lora") or st.name.pos), where("lora"), allowed)
            if d:
                diags.append(d)
        schema = params.get("json_schema")
        if schema is not None and "json_schema" in given:
            params["json_schema"], d = _json_schema_file(schema, _base_dir(where("json_schema") or st.name.pos),
                                                         where("json_schema"), allowed)
            if d:
                diags.append(d)
    return diags


LORA_EXPECTED = "a LoRA adapter: a PEFT folder holding adapter_config.json and adapter_model.safetensors"


def _lora_folder(path: str, base: str | None, pos: SourcePos,
                 allowed: tuple[str, ...]) -> tuple[str, Diagnostic | None]:
    """generate.lora: the adapter folder found beside the .agp file (or from the working directory),
    inside the allowed folders, made absolute, once its adapter_config.json says an adapter agp can
    apply and its weights file is there (engine/lora.py check_folder; its matrices are checked
    against the model when the engine loads)."""
    from pipeline_dsl.model_files.lora import LoraError, check_folder

    from .loader import inside

    found = None
    for folder in ([base] if base else []) + [os.getcwd()]:
        candidate = os.path.join(folder, os.path.expanduser(path))
        if os.path.isdir(candidate):
            found = os.path.abspath(candidate)
            break
    if found is None:
        return path, _err(f"lora folder not found: '{path}'", pos, expected=LORA_EXPECTED)
    if not inside(found, allowed):
        return path, _err(f"lora folder '{path}' is outside the pipeline's folder", pos, expected=LORA_EXPECTED,
                          hint="move it there, or allow its folder with --allow-path DIR")
    try:
        check_folder(found)
    except LoraError as e:
        shown = str(e).replace(found, path.rstrip("/"), 1)       # the file as the .agp file names it
        return path, _err(f"lora adapter {shown}", pos, expected=LORA_EXPECTED)
    return found, None


SCHEMA_EXPECTED = "a JSON Schema file (relative to this .agp file) that constrained decoding can enforce"
MAX_SCHEMA_BYTES = 4 << 20       # a json_schema file: as large as a request body may be (agp serve)


# JSON Schema's types, and the names other languages give them that a schema's `type` is often
# written with (a Python or C habit): a `type` outside the first is not a keyword agp lacks but a typo
JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
TYPE_HABITS = {"float": "number", "double": "number", "int": "integer", "bool": "boolean", "str": "string",
               "list": "array", "dict": "object", "none": "null"}


def _schema_hint(why: str, closed: bool) -> str | None:
    """The help under a json_schema file's `cannot be enforced` error: none where agp's closed
    objects are the cause (`closed`: the message says what to write); for a `type` JSON Schema
    does not have, the types it has and the one meant; else what constrained decoding lacks."""
    if closed:
        return None
    bad = re.search(r"Invalid type: (.+)$", why)
    if bad:
        name = bad.group(1).strip()
        meant = TYPE_HABITS.get(name.lower()) or Suggestions(JSON_TYPES).closest(name)
        return f"a JSON Schema type is one of {', '.join(JSON_TYPES)}" + (f": did you mean '{meant}'?" if meant else "")
    return "constrained decoding supports most of JSON Schema; not, e.g., uniqueItems or not"


def _json_schema_file(path: str, base: str | None, pos: SourcePos,
                      allowed: tuple[str, ...]) -> tuple[str, Diagnostic | None]:
    """generate.json_schema: the file found beside the .agp file (or from the working directory),
    inside the allowed folders, made absolute, once it reads as JSON and compiles as the engine
    will compile it (constraints.py, without a tokenizer and without torch); anything else an
    error at the setting. No message quotes the file's text."""
    import json

    from .loader import inside, nearby, read_bytes

    found = not_a_file = None
    for folder in ([base] if base else []) + [os.getcwd()]:
        candidate = os.path.join(folder, os.path.expanduser(path))
        if os.path.isfile(candidate):
            found = os.path.abspath(candidate)
            break
        if not_a_file is None and os.path.exists(candidate) and inside(os.path.abspath(candidate), allowed):
            not_a_file = "a directory" if os.path.isdir(candidate) else "not a regular file"   # stat, never opened
    if found is None and not_a_file:
        return path, _err(f"json_schema '{path}' is {not_a_file}", pos, expected=SCHEMA_EXPECTED)
    if found is None:
        beside = os.path.join(base or os.getcwd(), os.path.expanduser(path))   # names of allowed folders only
        return path, _err(f"json_schema file not found: '{path}'", pos, expected=SCHEMA_EXPECTED,
                          hint=nearby(beside, path) if inside(beside, allowed) else None)
    if not inside(found, allowed):
        return path, _err(f"json_schema file '{path}' is outside the pipeline's folder", pos,
                          expected=SCHEMA_EXPECTED, hint="move it there, or allow its folder with --allow-path DIR")
    size = os.path.getsize(found)
    data, _ = read_bytes(found, limit=MAX_SCHEMA_BYTES) if size <= MAX_SCHEMA_BYTES else (None, None)
    if data is None:
        why = f"is too large ({size >> 20} MiB)" if size > MAX_SCHEMA_BYTES else "cannot be read"
        return path, _err(f"json_schema file '{path}' {why}", pos,
                          expected=f"a JSON Schema file of at most {MAX_SCHEMA_BYTES >> 20} MiB")
    try:
        schema = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:       # json's messages give a position, never the text
        return path, _err(f"json_schema file '{path}' is not JSON: {e}", pos, expected=SCHEMA_EXPECTED)
    except RecursionError:
        return path, _err(f"json_schema file '{path}' is nested too deeply", pos, expected=SCHEMA_EXPECTED)
    if not isinstance(schema, (dict, bool)):
        return path, _err(f"json_schema file '{path}' holds a {type(schema).__name__}, not a schema object",
                          pos, expected=SCHEMA_EXPECTED)
    from . import constraints       # no torch: the grammar only, no tokenizer

    try:
        constraints.check_spec({"type": "json_schema", "schema": schema})
    except constraints.GrammarError as e:
        return path, _err(f"json_schema file '{path}' cannot be enforced: {e}", pos, expected=SCHEMA_EXPECTED,
                          hint=_schema_hint(str(e), constraints.CLOSED in str(e)))
    except RecursionError:
        return path, _err(f"json_schema file '{path}' is nested too deeply", pos, expected=SCHEMA_EXPECTED)
    return found, None


def _base_dir(pos: SourcePos | None) -> str | None:
    """The folder a stage's relative paths (`fn`'s module, `json_schema`, `lora`) are looked up in:
    the file's; the current one for a pipeline read from standard input, as its `use` paths are."""
    from .loader import STDIN_NAME
    if pos is not None and pos.file == STDIN_NAME:
        return os.getcwd()
    if pos is None or not pos.file or pos.file.startswith("<"):
        return None
    return os.path.dirname(os.path.abspath(pos.file))


def _fn_folder(stage: ResolvedStage) -> str | None:
    """The folder a stage's `fn` module is looked up in first: that of the file that wrote the
    `fn` value (a derived pipeline's override, or the base's stage), else the stage's own."""
    return _base_dir(stage.param_pos.get("fn") or stage.pos)


def _read_fn(stage: ResolvedStage, read, default):
    """read(the function's info) of a python stage's `fn`, by its source (userfn); `default` for a
    stage that is no python stage with an `fn`, or whose function is not found."""
    from .userfn import FunctionNotFound, function_info

    if stage.kind is None or stage.kind.name != "python" or not isinstance(stage.params.get("fn"), str):
        return default
    try:
        return read(function_info(stage.params["fn"], _fn_folder(stage)))
    except FunctionNotFound:
        return default


def python_stage_labels(stage: ResolvedStage) -> set[str] | None:
    """The labels a python stage's function returns on every path, read from its source
    (userfn.always_labels): its every item leaves it carrying one of them. None when the source
    does not settle that (or the function is not found)."""
    from .userfn import always_labels

    return _read_fn(stage, always_labels, None)


def python_stage_returned_kinds(stage: ResolvedStage) -> list[tuple[int, str, str, bool]]:
    """The returns of a python stage's function that give, by its source, surely a Request or surely
    a Generated result (userfn.returned_kinds): [(line, kind, the value as written, whether every
    call returns it)]; [] when the source says nothing (or the function is not found)."""
    from .userfn import returned_kinds

    return _read_fn(stage, returned_kinds, [])


def python_stage_passes_item_on(stage: ResolvedStage) -> bool:
    """Whether a python stage's function surely gives back, on some path, the item it got
    (userfn.passes_item_on): a guard that answers some requests and passes the rest on."""
    from .userfn import passes_item_on

    return _read_fn(stage, passes_item_on, False)


def _check_python_labels(edges: list[ResolvedEdge], stages: dict[str, ResolvedStage]) -> list[Diagnostic]:
    """A `when LABEL` edge of a python stage whose function, by its source, never returns that
    label is a warning: a misspelt label (`when maths`) would otherwise send every item to
    `otherwise` without a word. Functions whose returns the source does not settle are left alone."""
    from . import conditions as C
    from .userfn import FunctionNotFound, function_info, returned_labels

    diags: list[Diagnostic] = []
    known: dict[str, set[str] | None] = {}
    for e in edges:
        src = stages[e.src]
        if e.cond is None or isinstance(e.cond, ast.Otherwise) or src.kind is None or src.kind.name != "python":
            continue
        if src.params.get("returns") == "many":      # a list of requests, never a label
            for lab in C.labels(e.cond):
                diags.append(_warn(f"stage '{e.src}' returns = many: its function returns a list of requests, "
                                   f"never a label, so `when {lab.name.text}` is never taken", lab.pos,
                                   expected="a comparison of a field each request carries "
                                            "(`when metadata.kind == \"math\"`), or an unconditional edge",
                                   hint="have the function put what tells the requests apart in each one's "
                                        "metadata, and compare it on the edge"))
            continue
        if e.src not in known:
            try:
                node = function_info(src.params["fn"], _fn_folder(src)).node
            except (FunctionNotFound, KeyError):
                node = None
            known[e.src] = returned_labels(node)
        labels = known[e.src]
        if labels is None:
            continue
        for lab in C.labels(e.cond):
            word = lab.name.text
            if word in labels:
                continue
            gives = ("it returns " + ", ".join(f"'{w}'" for w in sorted(labels))) if labels else \
                "it returns no label"
            # a label that is no name (`needs-repair`) can follow no `when`: the fix is in the function
            wrong = sorted(w for w in labels if not is_name(w))
            if wrong:
                gives += (f"; {', '.join(repr(w) for w in wrong)} {'is' if len(wrong) == 1 else 'are'} no name, "
                          "which no `when` can match")
            meant = closest(word, sorted(labels)) if labels else None
            hint = (None if meant is None else f"did you mean '{meant}'?" if is_name(meant) else
                    f"it returns '{meant}', but a label is a name (letters, digits and '_', no keyword): "
                    f"have {src.params['fn']} return '{word}' instead")
            written = sorted(w for w in labels if is_name(w))
            diags.append(_warn(f"stage '{e.src}': {src.params['fn']} never returns the label '{word}' ({gives}), "
                               "so this edge is never taken", lab.pos,
                               expected="when " + " | ".join(written) if written else
                               "a comparison of a field, or a function that returns this label",
                               hint=hint))
    return diags


def _check_edges(p: ast.Pipeline, stages: dict[str, ResolvedStage]):
    """Edges: stages that exist, conditions a source stage can carry (labels; comparisons on
    edges that carry request items are typed in graph.py, which knows the item types)."""
    from . import conditions as C

    diags: list[Diagnostic] = []
    edges: list[ResolvedEdge] = []
    seen: dict[tuple, SourcePos] = {}
    refused: set[str] = set()          # sources of conditional edges dropped for an error
    undefined = None                   # built on the first undefined name: once, not per name
    for ch in p.chains:
        for n in ch.stages:
            if n.text not in stages:
                if undefined is None:
                    by_kind = {s.kind.name: s.name for s in stages.values() if s.kind is not None}
                    undefined = (Suggestions(stages), Suggestions(by_kind), by_kind,
                                 "a stage of pipeline '" + p.name.text + "': " + one_of(stages))
                names, kinds, by_kind, expected = undefined
                hint = names.hint(n.text)
                if hint is None:              # named after a kind? point at the stage of that kind
                    close = kinds.hint(n.text)
                    if close:
                        kind = close.split("'")[1]
                        hint = f"did you mean '{by_kind[kind]}' (the {kind} stage)?"
                diags.append(_err(f"edge to undefined stage '{n.text}'", n.pos, expected=expected, hint=hint))
        cond = ch.condition
        ir = C.compile_condition(cond) if cond is not None else None
        for a, b in ch.edges():
            if a.text not in stages or b.text not in stages:
                if cond is not None and not isinstance(cond, ast.Otherwise):
                    refused.add(a.text)
                continue
            src = stages[a.text]
            bad = _check_condition_source(cond, src, a.text) if src.kind is not None else []
            if bad:
                diags += bad
                refused.add(a.text)
                continue
            key = (a.text, b.text, C.identity(ir))      # true and 1 are two conditions
            pos = SourcePos(a.pos.file, a.pos.line, a.pos.col, b.pos.end_line, b.pos.end_col)
            if key in seen:
                diags.append(_warn(f"duplicate edge {a.text} -> {b.text}" + _cond_words(ir),
                                   pos, notes=[("first declared here", seen[key])]))
                continue
            seen[key] = pos
            edges.append(ResolvedEdge(a.text, b.text, ir, pos, cond))
    diags += _shadowed_conditions(edges)
    diags += _conditions_otherwise_repeats(edges, refused)
    return edges, diags, refused


def _shadowed_conditions(edges: list[ResolvedEdge]) -> list[Diagnostic]:
    """A warning at each conditional edge whose pair of stages an edge without a condition joins
    too: that one takes every item there, so the condition decides nothing (`r -> out` beside
    `r -> out when finish_reason == "length"`: one graph edge, always taken) — where the stage
    has no other conditional edge, which a condition that holds keeps an item from."""
    plain = {(e.src, e.dst): e.pos for e in edges if e.condition is None}
    elsewhere = {e.src for e in edges if e.condition is not None and (e.src, e.dst) not in plain}
    return [_warn(f"edge {e.src} -> {e.dst}{_cond_words(e.condition)} decides nothing: {e.src} -> {e.dst} without "
                  f"a condition takes every item there", e.pos,
                  notes=[("declared without a condition here", plain[e.src, e.dst])],
                  hint="remove one of them (the edge without a condition, for the condition to apply)")
            for e in edges if e.condition not in (None, ("otherwise",)) and (e.src, e.dst) in plain
            and e.src not in elsewhere]


def _conditions_otherwise_repeats(edges: list[ResolvedEdge], refused: set[str]) -> list[Diagnostic]:
    """A warning at a conditional edge into the stage its source's `otherwise` edge leads to, where
    no conditional edge after it (in file order) leads elsewhere: an item its condition holds for
    goes there, and one it does not hold for goes there too (`r -> x when C` beside `r -> x
    otherwise`), so the condition decides nothing. An edge to another stage listed after it keeps
    it: the first condition that holds wins, so it keeps those items from that edge. Not for a
    stage one of whose conditional edges an error dropped. The hint offers `r -> x` once without a
    condition only where no conditional edge of the stage leads elsewhere: beside one that does
    (`r -> y when D` before it), an edge without a condition takes a copy of every item, a D one
    too (a fan-out: two answers), so there the fix is to remove the conditional edge."""
    by_src: dict[str, list[ResolvedEdge]] = {}
    for e in edges:
        by_src.setdefault(e.src, []).append(e)
    diags = []
    for n, out in by_src.items():
        fallback = next((e for e in out if e.condition == ("otherwise",)), None)
        if fallback is None or n in refused:
            continue
        conditional = [e for e in out if e.condition not in (None, ("otherwise",))]
        for i, e in enumerate(conditional):
            if e.dst != fallback.dst or any(later.dst != e.dst for later in conditional[i + 1:]):
                continue
            others = sorted({c.dst for c in conditional if c.dst != e.dst})
            if others:
                hint = (f"remove `{n} -> {e.dst}{_cond_words(e.condition)}` (the `otherwise` edge takes those items to "
                        f"'{e.dst}'), or send it to another stage; not `{n} -> {e.dst}` without a condition: beside "
                        f"the conditional edge{'s' if len(others) > 1 else ''} to "
                        f"{', '.join(repr(o) for o in others)} it would take a copy of every item (a fan-out)")
            else:
                hint = f"send one of them to another stage, or write `{n} -> {e.dst}` once without a condition"
            diags.append(_warn(f"edge {n} -> {e.dst}{_cond_words(e.condition)} decides nothing: the `otherwise` "
                               f"edge of '{n}' leads to '{e.dst}' too, so an item goes there whether the condition "
                               "holds or not", e.pos, notes=[("the `otherwise` edge is here", fallback.pos)],
                               hint=hint))
    return diags


def _cond_words(ir) -> str:
    from . import conditions as C

    if ir is None:
        return ""
    return " otherwise" if ir == ("otherwise",) else " when " + C.text(ir)


# kinds whose out-edges carry batches or tokens inside an engine segment: no field conditions
_SEGMENT_INNER = {"dynamic_batch": "the batcher", "encode": "the encode stage"}


def _compare_example(word: str, ftype: str) -> str:
    """A comparison of `word` of its own type, for a field written alone as if it were a label."""
    from . import conditions as C

    if ftype == C.NUMBER:
        return f"e.g. when {word} > 512"
    if ftype == C.BOOLEAN:
        return f"e.g. when {word} == true"
    return f'e.g. when {word} == "…"'


def _check_condition_source(cond, src: ResolvedStage, name: str) -> list[Diagnostic]:
    """Labels the source stage's items can carry; where field comparisons may stand."""
    from . import conditions as C
    from stages.registry import ANY_LABEL

    if cond is None or isinstance(cond, ast.Otherwise):
        return []
    diags = []
    kind = src.kind
    for lab in C.labels(cond):
        word = lab.name.text
        if ANY_LABEL in kind.conditions or word in kind.conditions:
            continue
        fields = C.known_fields(["Request", "Generated"])
        if word in C.KEYED:             # when headers: a key and a comparison are missing
            keyed = C.KEYED[word]
            diags.append(_err(f"field '{word}' needs a key and a comparison", lab.pos,
                              expected=f"{keyed.form} == VALUE" + (", ..." if keyed.keys == "any" else ""),
                              hint=f"e.g. when {keyed.example}"))
        elif word in fields:
            ftype = C.field_type(word, ["Generated"])
            diags.append(_err(f"field '{word}' needs a comparison", lab.pos,
                              expected=f"{word} == true or {word} == false" if ftype == C.BOOLEAN
                              else f"{word} == VALUE, {word} > N, ...",
                              hint=_compare_example(word, ftype)))
        elif kind.conditions:
            diags.append(_err(f"unknown condition '{word}' on an edge from '{name}'", lab.pos,
                              expected="when " + " | ".join(kind.conditions) + " (the labels of "
                                       f"{kind.name}), or a comparison of a request field",
                              hint=did_you_mean(word, kind.conditions)))
        else:
            diags.append(_err(f"stage '{name}' ({kind.name}) gives its items no label '{word}'", lab.pos,
                              expected="a comparison of a field (prompt_tokens > 512, metadata.KEY == \"…\") "
                                       "or `otherwise`; labels come from a batcher (full, timeout) or a "
                                       "python stage",
                              hint=did_you_mean(word, fields)))
    if kind.name in _SEGMENT_INNER:
        for cmp in C.compares(cond):
            diags.append(_err(f"{_SEGMENT_INNER[kind.name]} '{name}' cannot route by request fields",
                              cmp.pos, expected="when full | timeout" if kind.conditions else "an edge without "
                              "a condition", hint="route requests before the batcher: add a route stage "
                                                  "in front of it"))
    return diags
