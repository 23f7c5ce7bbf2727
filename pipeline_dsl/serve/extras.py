"""vLLM's request fields beyond OpenAI's, with the meaning vLLM gives them.

    extras = parse_extras(body, chat=True)     # APIError (400) naming the field
    extras.fields        # skip_special_tokens, spaces_between_special_tokens, include_stop_str_in_output,
                         # cache_salt (prefix-cache blocks shared only among requests of one salt)
    extras.constraint    # structured_outputs / guided_* / response_format as one constraint spec
    extras.template_kwargs, extras.request_id

Structured output: `response_format` (OpenAI), `structured_outputs` (vLLM ≥ 0.11: one of `json`,
`regex`, `choice`, `grammar`, `json_object`) and the older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` all become one spec of the constraint compiler
(engine/constrain.py), checked here so a spec it cannot enforce is a 400 naming the field the
client wrote. A request gives at most one of them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from pipeline_dsl.constraints import GrammarError, check_spec
from pipeline_dsl.requests_io import FREE_TEXT, RequestError, cache_salt, parse_response_format

from .api_error import APIError

FLAGS = ("skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output")
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FIELDS = (*FLAGS, *GUIDED, "structured_outputs", "request_id", "cache_salt")
CHAT_FIELDS = ("chat_template_kwargs",)
# variables the template gets from agp itself: a request may not set them through chat_template_kwargs
TEMPLATE_OWN = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")
STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}
# vLLM's options beside them, when true: (the key it sets on a JSON spec, its value); disable_fallback
# only keeps vLLM from trying a second backend, and agp has one
STRUCTURED_OPTIONS = {"disable_any_whitespace": ("compact", True),
                      "disable_additional_properties": ("close_objects", False),
                      "disable_fallback": (None, None)}


def bad(param: str, expected: str, value) -> APIError:
    shown = json.dumps(value)
    return APIError(f"'{param}' must be {expected}, not {shown if len(shown) <= 40 else shown[:37] + '...'}",
                    param=param)


@dataclass
class Extras:
    fields: dict = field(default_factory=dict)
    constraint: dict | None = None
    template_kwargs: dict | None = None
    request_id: str | None = None


def _schema(value, param: str):
    """A JSON Schema given as an object or as JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise APIError(f"'{param}' is not a JSON Schema: {e}", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise bad(param, "a JSON Schema object", value)
    return value


def _spec(kind: str, value, param: str) -> dict:
    """One constraint spec of the compiler from a guided field's value."""
    if kind == "json_schema":
        return {"type": "json_schema", "schema": _schema(value, param)}
    if kind == "json_object":
        if value is not True:
            raise bad(param, "true", value)
        return {"type": "json_object"}
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise bad(param, "a regular expression", value)
        return {"type": "regex", "pattern": value}
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad(param, "a non-empty array of non-empty strings", value)
        return {"type": "choice", "choices": list(value)}
    if not isinstance(value, str) or not value.strip():
        raise bad(param, "a grammar (Lark, or GBNF with a root rule)", value)
    return {"type": "grammar", "grammar": value}


def _constraint(obj: dict) -> tuple[dict | None, str | None]:
    """(the spec, the field it came from) of the request's structured-output field, if any."""
    given = [k for k in ("response_format", "structured_outputs", *GUIDED) if obj.get(k) is not None]
    if obj.get("response_format") is not None:
        try:                                     # {"type": "text"} gives way to a guided_* field
            if parse_response_format(obj["response_format"]) == FREE_TEXT and len(given) > 1:
                given.remove("response_format")
        except RequestError as e:
            raise APIError(str(e), param=e.param) from None
    if len(given) > 1:
        raise APIError(f"give at most one of {', '.join(repr(g) for g in given)}: each sets the answer's format",
                       param=given[1])
    if not given:
        return None, None
    name = given[0]
    if name == "response_format":
        return parse_response_format(obj[name]), name
    if name == "structured_outputs":
        so = obj[name]
        if not isinstance(so, dict):
            raise bad(name, "an object", so)
        keys = [k for k in so if so[k] is not None and k in STRUCTURED_KEYS]
        unknown = [k for k in so if k not in STRUCTURED_KEYS and k not in STRUCTURED_OPTIONS and so[k] is not None]
        if unknown:
            raise APIError(f"'structured_outputs.{unknown[0]}' is not supported: give one of "
                           f"{', '.join(STRUCTURED_KEYS)} (and {', '.join(STRUCTURED_OPTIONS)})",
                           param=f"structured_outputs.{unknown[0]}")
        if len(keys) != 1:
            raise APIError(f"'structured_outputs' must set exactly one of {', '.join(STRUCTURED_KEYS)}",
                           param=name)
        spec = _spec(STRUCTURED_KEYS[keys[0]], so[keys[0]], f"{name}.{keys[0]}")
        for option, (key, value) in STRUCTURED_OPTIONS.items():
            if so.get(option) is not None:
                if not isinstance(so[option], bool):
                    raise bad(f"{name}.{option}", "true or false", so[option])
                if so[option] and spec["type"] in ("json_schema", "json_object") and key:
                    spec[key] = value
        return spec, f"{name}.{keys[0]}"
    kind = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
            "guided_grammar": "grammar"}[name]
    return _spec(kind, obj[name], name), name


def parse_extras(obj: dict, *, chat: bool) -> Extras:
    out = Extras()
    for name in FLAGS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise bad(name, "true or false", value)
            out.fields[name] = value
    if obj.get("cache_salt") is not None:
        try:
            out.fields["cache_salt"] = cache_salt(obj["cache_salt"])
        except RequestError as e:
            raise APIError(str(e), param=e.param) from None
    rid = obj.get("request_id")
    if rid is not None:
        if not (isinstance(rid, str) and 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable()
                and " " not in rid):
            raise bad("request_id", "a string of 1 to 128 printable ASCII characters without spaces", rid)
        out.request_id = rid
    kwargs = obj.get("chat_template_kwargs") if chat else None
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "an object of template variables", kwargs)
        own = [k for k in kwargs if k in TEMPLATE_OWN]
        if own:
            raise APIError(f"'chat_template_kwargs.{own[0]}' is set by agp itself; send it as its own field",
                           param="chat_template_kwargs")
        out.template_kwargs = dict(kwargs)
    out.constraint, where = _constraint(obj)
    if out.constraint is not None and out.constraint.get("type") not in ("json_object", "text"):
        problem = _problem(json.dumps(out.constraint, sort_keys=True))
        if problem:
            raise APIError(f"'{where}' cannot be enforced: {problem}", param=where)
    return out


@functools.lru_cache(maxsize=256)
def _problem(spec_json: str) -> str | None:
    """Why the constraint cannot compile, or None (cached: clients repeat their schemas)."""
    try:
        check_spec(json.loads(spec_json))
    except GrammarError as e:
        return str(e)
    return None
