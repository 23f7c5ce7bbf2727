"""One schema per field: the stage parameters are the types and ranges of every setting.

A request's sampling fields (`agp run` lines, `agp serve` bodies), `SamplingParams` and
`EngineConfig` all validate through the `Param` of the stage parameter they set, so a
value that `agp check` accepts in a `.agp` file is accepted in a request and by the
engine, and one it rejects is rejected everywhere, with the same range in the message
(tests/test_one_schema.py walks every field).

    check_field("top_p", 0)          # ParamError: 'top_p' must be a number above 0 up to 1, not 0
    check_field("stop", "END")       # ["END"]
"""
from __future__ import annotations

import json
import math
from typing import Any

from .registry import (BOOL, DURATION, ENUM, FLOAT, INT, LIST_STR, SIZE, STR, Param, get_kind)

# request field -> (stage kind, parameter)
REQUEST_FIELDS: dict[str, tuple[str, str]] = {
    "max_tokens": ("generate", "max_new_tokens"),
    "temperature": ("generate", "temperature"),
    "top_p": ("generate", "top_p"),
    "top_k": ("generate", "top_k"),
    "seed": ("generate", "seed"),
    "stop": ("generate", "stop"),
    "ignore_eos": ("generate", "ignore_eos"),
    "n": ("generate", "n"),
    "presence_penalty": ("generate", "presence_penalty"),
    "frequency_penalty": ("generate", "frequency_penalty"),
    "repetition_penalty": ("generate", "repetition_penalty"),
    "min_p": ("generate", "min_p"),
    "min_tokens": ("generate", "min_tokens"),
    "bad_words": ("generate", "bad_words"),
}

# per-request token-id lists no stage parameter sets (the request's own: vLLM's allowed_token_ids):
# field -> the most ids it may hold (262,144: the largest vocabularies served today)
TOKEN_ID_FIELDS: dict[str, int] = {"allowed_token_ids": 1 << 18}

# a request's own scheduling priority (vLLM's `priority`), which no stage parameter sets: lower is
# admitted first under dynamic_batch's scheduling_policy = priority; a signed 64-bit integer
PRIORITY = Param("priority", INT, 0, "lower is admitted first (dynamic_batch.scheduling_policy = priority)",
                 min=-(1 << 63), max=(1 << 63) - 1)

# EngineConfig field -> (stage kind, parameter)
ENGINE_FIELDS: dict[str, tuple[str, str]] = {
    "max_batch_size": ("dynamic_batch", "max_batch_size"),
    "batch_timeout_s": ("dynamic_batch", "timeout"),
    "padding": ("dynamic_batch", "padding"),
    "policy": ("dynamic_batch", "policy"),
    "scheduling_policy": ("dynamic_batch", "scheduling_policy"),
    "max_tokens_per_step": ("dynamic_batch", "max_tokens_per_step"),
    "itl_target_s": ("dynamic_batch", "itl_target"),
    "long_prefill_threshold": ("dynamic_batch", "long_prefill_threshold"),
    "block_size": ("kv_lookup", "block_size"),
    "kv_budget_bytes": ("kv_lookup", "budget"),
    "dtype": ("generate", "dtype"),
    "compile": ("generate", "compile"),
    "prefill_chunk": ("generate", "prefill_chunk"),
    "speculate": ("generate", "speculate"),
    "speculative_tokens": ("generate", "speculative_tokens"),
    "prompt_lookup_max": ("generate", "prompt_lookup_max"),
    "prompt_lookup_min": ("generate", "prompt_lookup_min"),
    "seed": ("generate", "seed"),                   # serve --seed: the requests' range
    "max_queue": ("requests", "max_queue"),
    "max_prompt_tokens": ("requests", "max_prompt_tokens"),
}


class ParamError(ValueError):
    """A value outside its parameter's type or range; `field` names it. `quoted`: the parts of
    the message that show the value (a request's content, where a request gave it)."""

    def __init__(self, message: str, field: str, quoted: tuple[str, ...] = ()):
        super().__init__(message)
        self.field, self.quoted = field, quoted


def param_of(kind: str, name: str) -> Param:
    p = get_kind(kind).param(name)
    if p is None:
        raise KeyError(f"{kind}.{name}")
    return p


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expected(p: Param) -> str:
    """What a value of `p` must be, in words (the same words as the checker's)."""
    rng = ""
    if p.min is not None and p.min_exclusive:
        rng = f" above {_num(p.min)}" + (f" up to {_num(p.max)}" if p.max is not None else "")
    elif p.min is not None and p.max is not None:
        rng = f" from {_num(p.min)} to {_num(p.max)}"
    elif p.min is not None:
        rng = f" of at least {_num(p.min)}"
    elif p.max is not None:
        rng = f" of at most {_num(p.max)}"
    if p.type == INT:
        return "an integer" + rng
    if p.type == DURATION:
        return "a number of seconds" + rng
    if p.type == SIZE:
        return "a number of bytes" + rng
    if p.type == FLOAT:
        return "a number" + rng
    if p.type == BOOL:
        return "true or false"
    if p.type == STR:
        return "a string"
    if p.type == ENUM:
        return "one of " + ", ".join(p.choices)
    if p.type == LIST_STR:
        limits = []
        if p.max_items is not None:
            limits.append(f"at most {p.max_items}")
        if p.max_length is not None:
            limits.append(f"each of 1 to {p.max_length} characters")
        if p.max_total is not None:
            limits.append(f"{p.max_total} characters in all")
        return "a string or an array of strings" + (f" ({', '.join(limits)})" if limits else "")
    return p.type


def _shown(value) -> str:
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_value(p: Param, value: Any, field: str | None = None) -> Any:
    """`value` (a JSON value) for parameter `p`, normalised, or ParamError."""
    field = field or p.name

    def bad():
        return ParamError(f"'{field}' must be {expected(p)}, not {_shown(value)}", field, quoted=(_shown(value),))

    if value is None:
        if p.optional:
            return None
        raise bad()
    t = p.type
    if t == INT:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
    elif t in (FLOAT, DURATION, SIZE):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad()
        value = float(value) if t != SIZE else value
        if t == SIZE and not float(value).is_integer():
            raise bad()
    elif t == BOOL:
        if not isinstance(value, bool):
            raise bad()
        return value
    elif t == STR:
        if not isinstance(value, str) or (p.max_length is not None and len(value) > p.max_length):
            raise bad()
        return value
    elif t == ENUM:
        if not isinstance(value, str) or value not in p.choices:
            raise bad()
        return value
    elif t == LIST_STR:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
            raise bad()
        if p.max_items is not None and len(items) > p.max_items:
            raise ParamError(f"'{field}' holds {len(items)} strings; at most {p.max_items} are allowed", field)
        if p.nonblank and not all(s.strip() for s in items):
            blank = next(s for s in items if not s.strip())
            raise ParamError(f"'{field}' holds {_shown(blank)}, whitespace alone: give words with a character "
                             "besides whitespace", field, quoted=(_shown(blank),))
        if p.max_length is not None and any(len(s) > p.max_length for s in items):
            longest = max(len(s) for s in items)
            raise ParamError(f"a '{field}' string has {longest} characters; at most {p.max_length} are allowed",
                             field)
        total = sum(len(s) for s in items)
        if p.max_total is not None and total > p.max_total:
            raise ParamError(f"'{field}' holds {total} characters in all; at most {p.max_total} are allowed", field)
        return list(items)
    if not p.in_range(value):
        raise bad()
    return value


def check_field(field: str, value: Any, given_as: str | None = None) -> Any:
    """A request's sampling field, checked against the generate parameter it sets; an error names
    it as the request gave it (`given_as`: max_completion_tokens for max_tokens)."""
    kind, name = REQUEST_FIELDS[field]
    return check_value(param_of(kind, name), value, given_as or field)


def check_engine_field(field: str, value: Any) -> Any:
    kind, name = ENGINE_FIELDS[field]
    return check_value(param_of(kind, name), value, field)


def check_prompt_lookup(low: int, high: int) -> None:
    """speculate = ngram's lookup lengths (a generate stage's, EngineConfig's, --speculative-config's):
    prompt_lookup_min at most prompt_lookup_max, else ParamError naming prompt_lookup_min."""
    if low > high:
        raise ParamError(f"prompt_lookup_min ({low}) must be at most prompt_lookup_max ({high}): no suffix "
                         "could be looked up for a draft", "prompt_lookup_min")


def check_token_ids(field: str, value: Any) -> tuple[int, ...]:
    """A request's non-empty list of token ids (TOKEN_ID_FIELDS), as a tuple, or ParamError naming
    the field; whether each id is in the vocabulary is the engine's to say (it knows the model)."""
    most = TOKEN_ID_FIELDS[field]
    if not isinstance(value, (list, tuple)):
        raise ParamError(f"'{field}' must be an array of token ids, not {_shown(value)}", field,
                         quoted=(_shown(value),))
    if not value:
        raise ParamError(f"'{field}' is empty: give at least one token id (leave it out to allow every token)",
                         field)
    if len(value) > most:
        raise ParamError(f"'{field}' holds {len(value)} token ids; at most {most} are allowed", field)
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ParamError(f"'{field}[{i}]' must be a token id (an integer of at least 0), not {_shown(t)}",
                             field, quoted=(_shown(t),))
    return tuple(value)


def check_priority(value: Any) -> int:
    """A request's priority (PRIORITY) as an int, or ParamError naming the field (a whole float is
    that integer: `whole`)."""
    return check_value(PRIORITY, whole(value))


def whole(value: Any) -> Any:
    """A float with no fractional part as the int it is (4.0 -> 4), anything else as it is: the one
    rule for a request's integer-valued fields (requests_io.INTEGER_FIELDS, where a body or a line is
    read; SamplingParams' integer fields), as vLLM's pydantic models take 4.0 for an `int` field
    (lax mode). JSON encoders that write every number as a double (R's jsonlite, Lua, some
    JavaScript and Java number wrappers, YAML turned into JSON) send 4.0 for 4. 4.5, an infinity,
    NaN, true and "4" stay what they are, for the field's own check to refuse."""
    return int(value) if type(value) is float and value.is_integer() else value


def check_cache_salt(value: Any) -> str:
    """A request's cache_salt (vLLM's): a non-empty string, or ParamError naming the field."""
    if not isinstance(value, str) or not value:
        raise ParamError(f"'cache_salt' must be a non-empty string, not {_shown(value)}", "cache_salt",
                         quoted=(_shown(value),))
    return value


# generation_config.json keys vLLM takes as a request's sampling defaults -> the request field each sets
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_sampling(config: dict) -> dict:
    """{request field: value} of the GENERATION_KEYS a generation config sets, each checked by the
    field's one schema: ParamError names the key."""
    return {field: check_value(param_of(*REQUEST_FIELDS[field]), config[key], key)
            for key, field in GENERATION_KEYS.items() if config.get(key) is not None}


def check_generation_override(value: Any) -> dict:
    """vLLM's --override-generation-config: a JSON object of generation_config.json keys
    (GENERATION_KEYS) set over the defaults --generation-config gives (null: left unset), each
    value checked by its field's schema; a ValueError saying what is wrong otherwise."""
    import difflib

    if not isinstance(value, dict):
        raise ValueError("must be a JSON object of generation_config.json keys, e.g. '{\"temperature\": 0.5}', "
                         f"not {json.dumps(value, default=repr)[:40]}")
    for key in value:
        if key not in GENERATION_KEYS:
            close = difflib.get_close_matches(key, list(GENERATION_KEYS), n=1)
            raise ValueError(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                             + f": it takes {', '.join(GENERATION_KEYS)}")
    try:
        generation_sampling(value)
    except ParamError as e:
        raise ValueError(str(e)) from None
    return dict(value)
