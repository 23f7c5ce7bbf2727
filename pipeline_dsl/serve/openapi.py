"""The OpenAPI description of `agp serve`'s routes: request bodies and every answer they give.

The routes read their bodies themselves (protocol.py validates them and answers a 400 that
names the field), so FastAPI cannot infer the schemas: they are written here, as JSON
Schema, and attached to the routes with `openapi_extra`. `/openapi.json` then documents
what a client may send and each status it may get back, which is what a schema-driven
tester (schemathesis, in tests/test_openapi.py) checks the server against.
"""
from __future__ import annotations

from pipeline_dsl.constraints import MAX_STRUCTURES
from pipeline_dsl.engine.config import MAX_LOGPROBS
from pipeline_dsl.requests_io import (IDENTIFIER_CHARS, MAX_LOGIT_BIAS, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_LEN,
                                      MAX_TOOLS, METADATA_KEY_CHARS, METADATA_KEYS, METADATA_VALUE_CHARS, NOT_NULL,
                                      ROLES, TEXT_PARTS)
from stages.fields import PRIORITY, REQUEST_FIELDS, TOKEN_ID_FIELDS, param_of

from .embeddings import EMBED_DTYPES, ENDIANNESS, MAX_INPUTS
from .protocol import (CHAT_LACKING, CHAT_NEUTRAL, COMPLETION_LACKING, IDENTIFIERS, IDENTITY,
                       MAX_PROMPTS, NEUTRAL, REASONING_EFFORTS, RESPONSES_LACKING, TOKENIZE_LACKING)
from .responses import IMAGE_COMPRESSION, INCLUDABLE

# vLLM's structural tag (response_format of type "structural_tag"): free text, and after each trigger
# the structure whose begin starts with it
STRUCTURAL_TAG = {
    "structures": {"type": "array", "minItems": 1, "maxItems": MAX_STRUCTURES, "items": {
        "type": "object", "required": ["begin", "end"], "properties": {
            "begin": {"type": "string"}, "schema": {"type": "object"}, "end": {"type": "string"}}}},
    "triggers": {"type": "array", "minItems": 1, "maxItems": MAX_STRUCTURES,
                 "items": {"type": "string", "minLength": 1}}}
_SEED = param_of("generate", "seed")                # one schema: the range `agp check` takes
_BAD_WORDS = param_of("generate", "bad_words")


def _number(field: str) -> dict:
    """The JSON Schema of a sampling field from the generate parameter it sets (stages/fields.py)."""
    p = param_of(*REQUEST_FIELDS[field])
    out: dict = {"type": "integer" if p.type == "int" else "number"}
    if p.min is not None:
        out["exclusiveMinimum" if p.min_exclusive else "minimum"] = p.min
    if p.max is not None:
        out["maximum"] = p.max
    return out


def _neutral(table: dict) -> dict:
    """Fields served only at their neutral value (protocol.NEUTRAL): that value, or null."""
    return {name: {"enum": [*allowed, None], "description": "only the value that changes nothing"}
            for name, (allowed, _) in table.items()}

def _or_null(schema: dict) -> dict:
    """`schema`, or null."""
    if "enum" in schema:
        return schema if None in schema["enum"] else {**schema, "enum": [*schema["enum"], None]}
    if "oneOf" in schema:
        return schema if {"type": "null"} in schema["oneOf"] else {**schema, "oneOf": [*schema["oneOf"],
                                                                                       {"type": "null"}]}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return schema if "null" in types else {**schema, "type": [*types, "null"]}


# vLLM's whitespace_pattern (structured_outputs') and guided_whitespace_pattern, as requests_io reads them
WHITESPACE_PATTERN = ("a regex of the whitespace between a JSON answer's tokens (none or one match of it), matching "
                      "only spaces, tabs, newlines and carriage returns; with a JSON format only")


def _request(required: str | None, properties: dict) -> dict:
    """A request body's schema as the server reads it: each field but the required one may be null,
    which is the field left out (clients send null for what they leave unset, as vLLM's Optional
    fields take it), except requests_io.NOT_NULL (priority), refused as vLLM refuses it."""
    return {"type": "object", **({"required": [required]} if required else {}), "additionalProperties": False,
            "properties": {name: field if name == required or name in NOT_NULL else _or_null(field)
                           for name, field in properties.items()}}


STOP = {"oneOf": [
    {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
    {"type": "array", "maxItems": MAX_STOP, "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LEN},
     "description": f"at most {MAX_STOP_CHARS} characters in all"},
    {"type": "null"},
]}

# stream_options.include_obfuscation (OpenAI's; chat, completions and responses): agp adds no obfuscation
# OpenAI's bounds of metadata (requests_io.check_metadata); a value that is no string is bounded by its JSON's length
METADATA = {"type": "object", "maxProperties": METADATA_KEYS, "propertyNames": {"maxLength": METADATA_KEY_CHARS},
            "additionalProperties": {"oneOf": [{"type": "string", "maxLength": METADATA_VALUE_CHARS},
                                               {"not": {"type": "string"}}]},
            "description": f"at most {METADATA_KEYS} keys of {METADATA_KEY_CHARS} characters, each value at most "
                           f"{METADATA_VALUE_CHARS} characters (another value than a string: its compact JSON's)"}
OBFUSCATION = {"include_obfuscation": {"type": ["boolean", "null"],
                                       "description": "taken; agp's chunks carry no obfuscation field"}}

SAMPLING = {
    "model": {"type": "string", "description": "the pipeline (its name), or one of its generate stages"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer", "minimum": _SEED.min, "maximum": _SEED.max},
    "stop": STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "ignore_eos": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 1, "maximum": 64},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]},
                                                        "continuous_usage_stats": {"type": ["boolean", "null"]},
                                                        **OBFUSCATION},
                       "additionalProperties": False},
    "user": {"type": "string", "maxLength": IDENTIFIER_CHARS["user"]},
    **{name: _number(name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
                                        "min_tokens")},
    "logit_bias": {"type": "object", "maxProperties": MAX_LOGIT_BIAS, "description": "token id -> bias",
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
    "response_format": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema", "structural_tag"]},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {
            "name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": ["boolean", "null"]}}},
        "schema": {"type": "object", "description": "llama.cpp's form: beside type json_object, the schema the "
                                                    "JSON object follows (as json_schema's)"},
        **STRUCTURAL_TAG}},
    **_neutral(NEUTRAL),
    # vLLM's extras (serve/extras.py)
    "skip_special_tokens": {"type": "boolean"},
    "spaces_between_special_tokens": {"type": "boolean"},
    "include_stop_str_in_output": {"type": "boolean"},
    "request_id": {"type": "string", "pattern": "^[!-~]{1,128}$"},
    "guided_json": {"type": "object"},
    "guided_regex": {"type": "string"},
    "guided_choice": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    "guided_grammar": {"type": "string"},
    "guided_whitespace_pattern": {"type": "string", "description": WHITESPACE_PATTERN},
    "structural_tag": {"type": ["string", "object"], "description": "vLLM < 0.11's: a structural tag, or its JSON text"},
    "guided_decoding_backend": {"type": "string", "description": "taken and ignored: llguidance serves all"},
    "session_id": {"type": "string", "description": "vLLM's: taken and ignored (a router's hint)"},
    "stream_interval": {"type": "integer", "minimum": 1, "description": "vLLM's: taken and ignored (the server "
                                                                         "chooses how a stream groups its tokens)"},
    **{name: {"type": "boolean", "description": "vLLM's: taken and ignored (its render routes read it)"}
       for name in ("return_token_offsets", "return_mm_kwargs")},
    "truncate_prompt_tokens": {"type": "integer", "minimum": -1, "description": "keep the prompt's last k tokens"},
    "priority": {"type": "integer", "minimum": PRIORITY.min, "maximum": PRIORITY.max,
                 "description": "lower is admitted first under --scheduling-policy priority (fcfs: 0 alone)"},
    "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                        "description": "each prompt token's logprob and this many alternatives (0 alone on a stream)"},
    "allowed_token_ids": {"type": "array", "minItems": 1, "maxItems": TOKEN_ID_FIELDS["allowed_token_ids"],
                          "items": {"type": "integer", "minimum": 0}, "description": "only these may be sampled"},
    "return_token_ids": {"type": "boolean", "description": "the prompt's and the answer's token ids too"},
    "return_tokens_as_token_ids": {"type": "boolean", "description": "logprobs name tokens 'token_id:N'"},
    "bad_words": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": _BAD_WORDS.max_length},
                            {"type": "array", "maxItems": _BAD_WORDS.max_items,
                             "items": {"type": "string", "minLength": 1, "maxLength": _BAD_WORDS.max_length}},
                            {"type": "null"}],
                  "description": "words never generated, beside the generate stage's bad_words"},
    "cache_salt": {"type": ["string", "null"], "minLength": 1,
                   "description": "prefix-cache blocks are shared only among requests of the same salt (null: none, "
                                  "as vLLM's optional field)"},
    "structured_outputs": {"type": "object", "properties": {
        "json": {"type": "object"}, "regex": {"type": "string"}, "grammar": {"type": "string"},
        "choice": {"type": "array", "items": {"type": "string"}}, "json_object": {"type": "boolean"},
        "structural_tag": {"type": ["string", "object"],
                           "description": "vLLM's structural tag ({\"structures\", \"triggers\"}), or its JSON text"},
        "disable_any_whitespace": {"type": "boolean", "description": "JSON without whitespace between tokens"},
        "disable_additional_properties": {"type": "boolean",
                                          "description": "objects as open as the schema leaves them"},
        "disable_fallback": {"type": "boolean", "description": "taken: one backend"},
        "whitespace_pattern": {"type": "string", "description": WHITESPACE_PATTERN}}},
}

TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
             "properties": {"type": {"enum": list(TEXT_PARTS)}, "text": {"type": "string"}},
             "description": "text (the Responses API's input_text and output_text too, as vLLM reads them)"}

REFUSAL_PART = {"type": "object", "required": ["type", "refusal"], "additionalProperties": False,
                "properties": {"type": {"const": "refusal"}, "refusal": {"type": "string"}},
                "description": "an assistant message's"}

TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": ["string", "object"]}}}}}

MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": list(ROLES)},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [TEXT_PART, REFUSAL_PART, {"type": "string"}]}},
                          {"type": "null"}],
                "description": "null only on an assistant message (one that made tool calls)"},
    "name": {"type": "string"},
    "tool_calls": {"type": "array", "items": TOOL_CALL, "description": "an assistant message's calls"},
    "tool_call_id": {"type": "string", "description": "a tool message: the call it answers"},
}}

TOOL = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": ["boolean", "null"]}}}}}

TOOL_CHOICE = {"oneOf": [{"enum": ["none", "auto", "required"]},
                         {"type": "object", "required": ["function"], "properties": {
                             "type": {"const": "function"},
                             "function": {"type": "object", "required": ["name"],
                                          "properties": {"name": {"type": "string"}}}}}]}

# OpenAI's prompt-cache settings (protocol.CACHE_SETTINGS)
CACHE = {"prompt_cache_retention": {"enum": ["in_memory", "24h", None], "description": "taken and ignored"},
         "prompt_cache_options": {"type": ["object", "null"], "description": "taken and ignored", "properties": {
             "mode": {"enum": ["implicit", "explicit", None]}, "ttl": {"type": ["string", "null"]}}}}

CHAT_REQUEST = _request("messages", {
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "metadata": METADATA,
    "chat_template_kwargs": {"type": "object", "description": "extra variables of the chat template"},
    "add_generation_prompt": {"type": "boolean", "description": "open the assistant's turn after the messages "
                                                                  "(default true)"},
    "continue_final_message": {"type": "boolean", "description": "the answer goes on with the last message "
                                                                   "(give add_generation_prompt false or leave it out)"},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "logprobs": {"type": ["boolean", "null"]},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS, "description": "with logprobs"},
    "tools": {"type": "array", "minItems": 1, "maxItems": MAX_TOOLS, "items": TOOL},
    "tool_choice": {**TOOL_CHOICE, "description": "with 'tools' (without them, only \"none\")"},
    "store": {"type": ["boolean", "null"], "description": "taken and ignored"},
    "service_tier": {"type": ["string", "null"], "description": "taken and ignored"},
    "reasoning_effort": {"enum": [*REASONING_EFFORTS, None],
                         "description": "taken and ignored (Qwen3 thinks as enable_thinking says)"},
    "include_reasoning": {"type": "boolean", "description": "vLLM's: false leaves the thinking agp serve "
                                                            "--reasoning-parser splits out of the answer"},
    **{name: {"type": "string", "maxLength": IDENTIFIER_CHARS[name],
              "description": "the end user's id: python stages and conditions read it"
              if name in IDENTITY else "taken and ignored"} for name in IDENTIFIERS},
    **CACHE,
    **SAMPLING,
    **_neutral(CHAT_NEUTRAL),
    **_neutral(CHAT_LACKING),
})

# vLLM's add_special_tokens of completions and embeddings (protocol.add_special_tokens)
ADD_SPECIAL_TOKENS = {"type": ["boolean", "null"], "description": "a text prompt's start token (default true; vLLM's)"}

COMPLETION_REQUEST = _request("prompt", {
    "add_special_tokens": ADD_SPECIAL_TOKENS,
    "prompt": {"oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": {"oneOf": [      # a batch
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}},
    ]},
    "metadata": METADATA,
    "echo": {"type": "boolean", "description": "the prompt before the answer (max_tokens 0: only the prompt)"},
    "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
    **SAMPLING,
    "max_tokens": {"type": "integer", "minimum": 0, "description": "0 only with echo: score the prompt"},
    **_neutral(COMPLETION_LACKING),
})

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"},
    "completion_tokens_details": {"type": "object", "description": "where agp serve --reasoning-parser reads a chat "
                                  "answer: reasoning_tokens, the tokens of its thinking",
                                  "properties": {"reasoning_tokens": {"type": "integer"}}}}}

FINISH = {"type": ["string", "null"]}
NO_REASONING = ("vLLM's reasoning field: a reasoning model's thinking, the text before </think>, where agp serve "
                "--reasoning-parser splits it out, else null (reasoning_content: its older name)")
STOP_REASON = {"type": ["string", "integer", "null"],
               "description": "vLLM's: the stop string or stop_token_ids id that ended the answer, else null"}

CHAT_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                 "properties": {
                     "id": {"type": "string"}, "object": {"const": "chat.completion"},
                     "system_fingerprint": {"type": ["string", "null"]},
                     "created": {"type": "integer"}, "model": {"type": "string"}, "usage": USAGE,
                     "choices": {"type": "array", "items": {
                         "type": "object", "required": ["index", "message", "finish_reason"],
                         "properties": {"index": {"type": "integer"}, "finish_reason": FINISH,
                                        "stop_reason": STOP_REASON,
                                        "message": {"type": "object", "required": ["role", "content"],
                                                    "properties": {"role": {"const": "assistant"},
                                                                   "content": {"type": ["string", "null"]},
                                                                   **{name: {"type": ["string", "null"],
                                                                             "description": NO_REASONING}
                                                                      for name in ("reasoning", "reasoning_content")}}}}}}}}

COMPLETION_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
                           "id": {"type": "string"}, "object": {"const": "text_completion"},
                           "system_fingerprint": {"type": ["string", "null"]},
                           "created": {"type": "integer"}, "model": {"type": "string"}, "usage": USAGE,
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "text", "finish_reason"],
                               "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                              "finish_reason": FINISH, "stop_reason": STOP_REASON}}}}}


RESPONSES_REQUEST = _request("input", {
    "model": SAMPLING["model"],
    "input": {"oneOf": [{"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "items": {"type": "object"}}]},
    "instructions": {"type": "string"},
    "max_output_tokens": {"type": "integer", "minimum": 1},
    "temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"], "stream": {"type": "boolean"},
    "store": {"type": "boolean"}, "previous_response_id": {"type": "string"},
    "tools": {"type": "array", "maxItems": MAX_TOOLS, "items": {"type": "object", "required": ["name"], "properties": {
        "type": {"const": "function"}, "name": {"type": "string"}, "description": {"type": "string"},
        "parameters": {"type": "object"}}}},
    "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "text": {"type": "object"},
    "metadata": METADATA,
    "include": {"type": "array", "items": {"enum": list(INCLUDABLE)},
                "description": "message.output_text.logprobs is served; OpenAI's other values include nothing here"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
    "background": {"enum": [False, None], "description": "agp answers in the foreground"},
    "stream_options": {"type": ["object", "null"], "properties": OBFUSCATION, "additionalProperties": False},
    **{name: {"type": ["string", "null"], "description": "repeated in the answer"}
       for name in ("truncation", "service_tier")},
    **{name: {"type": ["string", "null"], "maxLength": IDENTIFIER_CHARS[name], "description": "repeated in the answer"}
       for name in IDENTIFIERS},
    "reasoning": {"type": ["object", "null"], "description": "repeated in the answer",
                  "properties": {"effort": {"enum": [*REASONING_EFFORTS, None]}}},
    "max_tool_calls": {"type": ["integer", "null"], "minimum": 1},
    **{name: {**schema, "description": "repeated in the answer"} for name, schema in CACHE.items()},
    "image": {"type": "object", "additionalProperties": False, "description": "taken and ignored (text only)",
              "properties": {"context_compression": {"enum": [*IMAGE_COMPRESSION, None]}}},
    **_neutral(RESPONSES_LACKING),
    **{name: SAMPLING[name] for name in ("request_id", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                                         "ignore_eos", "structured_outputs", "guided_json", "guided_regex",
                                         "guided_choice", "guided_grammar", "guided_whitespace_pattern", "priority",
                                         "cache_salt")},
    "chat_template_kwargs": {"type": "object", "description": "extra variables of the chat template (vLLM's)"}})

RESPONSES_RESPONSE = {"type": "object", "required": ["id", "object", "created_at", "status", "model", "output"],
                      "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                                     "created_at": {"type": "integer"}, "model": {"type": "string"},
                                     "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
                                     "output": {"type": "array", "items": {"type": "object"}}}}

SSE_EVENT = {"type": "object", "description": "one server-sent event: a chunk, an error object, or [DONE]",
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


ERRORS = {
    "400": _error("a field is missing, of the wrong type or out of range; the prompt is too long; a stage "
                  "of the pipeline refused the request (code rejected); invalid JSON or Unicode"),
    "404": _error("the model names neither this pipeline nor one of its generate stages"),
    "408": _error("the request body did not arrive in time (--body-timeout, --body-min-rate)"),
    "413": _error("the request body is larger than --max-body-bytes, or than any prompt the pipeline takes "
                  "(a gzip or deflate body: as sent or once decoded)"),
    "415": _error("the request body is not application/json, or its Content-Encoding is neither gzip nor deflate"),
    "429": _error("requests.max_queue requests are waiting, or a python stage's Reject(status=429): retry after "
                  "Retry-After seconds"),
    "500": _error("a stage of the pipeline (a user function) failed on this request, or a python stage's "
                  "Reject(status=5xx) refused it (type server_error)"),
    "503": _error("the server is shutting down, is overloaded (--max-connections, --max-body-bytes-arriving) "
                  "or its engine failed"),
}


def azure(operation: dict) -> dict:
    """openapi_extra of an Azure OpenAI route: `operation` (its /v1 route's) with the deployment
    in its path (the model that answers) and Azure's api-version query, which it takes and reads not."""
    return {**operation, "parameters": [
        {"name": "deployment", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "the model that answers (a served name, a generate stage or a LoRA adapter); the body's "
                        "'model' is replaced by it"},
        {"name": "api-version", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "Azure's API version (openai.AzureOpenAI sends it): taken, and answered as /v1"}]}


def generation(request_schema: dict, response_schema: dict, summary: str) -> dict:
    """openapi_extra of a generation route."""
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "200": {"description": "the answer (JSON), or with \"stream\": true server-sent events ending in "
                                   "data: [DONE]",
                    "content": {"application/json": {"schema": response_schema},
                                "text/event-stream": {"schema": SSE_EVENT}}},
            **ERRORS,
        },
    }


# vLLM's model card (serve/routes.py, model_entry)
MODEL_CARD = {"type": "object", "required": ["id", "object", "created", "owned_by", "root", "parent", "max_model_len",
                                             "permission"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"},
    "root": {"type": ["string", "null"], "description": "the model that answers (null: several do)"},
    "parent": {"type": ["string", "null"], "description": "a generate stage's: the served name it belongs to"},
    "max_model_len": {"type": "integer"},
    "permission": {"type": "array", "items": {"type": "object", "required": ["id", "object"]}}}}

MODELS = {"responses": {"200": {"description": "the pipeline and its generate stages", "content": {
    "application/json": {"schema": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}}}}}}}}

HEALTH = {"responses": {
    "200": {"description": "serving", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"const": "ok"}}}}}},
    "503": {"description": "draining or failed", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string"}}}}}}}}

METRICS = {"responses": {"200": {"description": "Prometheus text format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}}

STATS = {"responses": {"200": {"description": "per stage, per engine and request counters",
                               "content": {"application/json": {"schema": {"type": "object"}}}}}}

MODEL = {"responses": {"200": {"description": "the model", "content": {"application/json": {"schema": MODEL_CARD}}},
                       "404": _error("no such model")}}

TRACE_FLUSH = {"responses": {
    "200": {"description": "the trace so far was written to the --trace file", "content": {"application/json": {
        "schema": {"type": "object", "required": ["trace", "spans"], "properties": {
            "trace": {"type": "string"}, "spans": {"type": "integer"}}}}}},
    "404": _error("tracing is off (no --trace)")}}

VERSION = {"responses": {"200": {"description": "agp's version", "content": {"application/json": {"schema": {
    "type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}}}}}}}

TOKENIZE_REQUEST = _request(None, {      # a prompt or messages (the other left out or null)
    "model": {"type": "string"}, "prompt": {"type": "string"},
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"},
    "continue_final_message": {"type": "boolean"}, "return_token_strs": {"type": "boolean"},
    "tools": {"type": "array", "minItems": 1, "maxItems": MAX_TOOLS, "items": {"type": "object"}},
    "chat_template_kwargs": {"type": "object", "description": "extra variables of the chat template"},
    **_neutral(TOKENIZE_LACKING)})

TOKENIZE = {"requestBody": {"required": True, "content": {"application/json": {"schema": TOKENIZE_REQUEST}}},
            "responses": {"200": {"description": "the prompt's token ids", "content": {"application/json": {
                "schema": {"type": "object", "required": ["count", "max_model_len", "tokens"], "properties": {
                    "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                    "tokens": {"type": "array", "items": {"type": "integer"}},
                    "token_strs": {"type": ["array", "null"], "items": {"type": "string"},
                                   "description": "each id's vocabulary string, with return_token_strs"}}}}}},
                **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "503")}}}

DETOKENIZE = {"requestBody": {"required": True, "content": {"application/json": {"schema": _request("tokens", {
    "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}})}}},
              "responses": {"200": {"description": "the text of the tokens", "content": {"application/json": {
                  "schema": {"type": "object", "required": ["prompt"],
                             "properties": {"prompt": {"type": "string"}}}}}},
                  **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "503")}}}

TOKENIZER_INFO = {"responses": {
    "200": {"description": "the tokenizer's special tokens, context length and chat template (vLLM's "
                           "/tokenizer_info)", "content": {"application/json": {"schema": {
                               "type": "object", "required": ["tokenizer_class", "eos_token"], "properties": {
                                   "tokenizer_class": {"type": "string"},
                                   "bos_token": {"type": ["string", "null"]},
                                   "eos_token": {"type": ["string", "null"]},
                                   "pad_token": {"type": ["string", "null"]},
                                   "unk_token": {"type": ["string", "null"]},
                                   "added_tokens_decoder": {"type": "object",
                                                            "additionalProperties": {"type": "string"}},
                                   "add_bos_token": {"type": "boolean"},
                                   "model_max_length": {"type": "integer"},
                                   "chat_template": {"type": ["string", "null"]}}}}}},
    **{k: ERRORS[k] for k in ("400", "503")}}}

RESPONSE_GET = {"parameters": [{"name": "stream", "in": "query", "required": False, "schema": {"type": "boolean"},
                                 "description": "false only: a stored response is not streamed again"}],
                "responses": {"200": {"description": "a stored response", "content": {"application/json": {
                    "schema": RESPONSES_RESPONSE}}}, "404": _error("no stored response has this id"),
                    "400": _error("'stream' is true: agp answers in the foreground, nothing is streamed again")}}

# POST /v1/responses/input_tokens: the body's fields that shape the prompt (responses.COUNT_FIELDS); `input`
# or previous_response_id (whose stored conversation is counted), as OpenAI's count takes it
RESPONSE_INPUT_TOKENS = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {**_request(None, {
        k: v for k, v in RESPONSES_REQUEST["properties"].items()
        if k in ("model", "input", "instructions", "tools", "tool_choice", "previous_response_id", "conversation",
                 "reasoning", "text", "truncation", "parallel_tool_calls", "chat_template_kwargs")}),
        "anyOf": [{"required": ["input"]}, {"required": ["previous_response_id"]}]}}}},
    "responses": {"200": {"description": "the tokens of the prompt a response to this body would have",
                          "content": {"application/json": {"schema": {
                              "type": "object", "required": ["object", "input_tokens"], "properties": {
                                  "object": {"const": "response.input_tokens"},
                                  "input_tokens": {"type": "integer", "minimum": 0}}}}}},
                  **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "503")}}}

RESPONSE_DELETE = {"responses": {"200": {"description": "the response was forgotten", "content": {
    "application/json": {"schema": {"type": "object", "required": ["id", "deleted"]}}}},
    "404": _error("no stored response has this id")}}

TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}

EMBEDDINGS_INPUT = {"oneOf": [{"type": "string", "minLength": 1}, TOKEN_IDS,
                             {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": {"oneOf": [
                                 {"type": "string", "minLength": 1}, TOKEN_IDS]}}]}


def _embeddings_request() -> dict:
    """The body of /v1/embeddings: `input`, or vLLM's chat form (`messages`); `input` is never null
    (it is what the request embeds)."""
    schema = _request(None, {
        "model": {"type": "string"},
        "input": EMBEDDINGS_INPUT,
        "encoding_format": {"enum": ["float", "base64"]}, "normalize": {"type": "boolean"},
        "dimensions": {"type": "integer", "description": "only the model's own"},
        "user": {"type": "string"}, "request_id": SAMPLING["request_id"], "priority": SAMPLING["priority"],
        "add_special_tokens": ADD_SPECIAL_TOKENS, "truncate_prompt_tokens": SAMPLING["truncate_prompt_tokens"],
        "embed_dtype": {"enum": list(EMBED_DTYPES), "description": "a base64 embedding's numbers (vLLM's)"},
        "endianness": {"enum": list(ENDIANNESS), "description": "a base64 embedding's byte order (vLLM's)"},
        # vLLM's chat form: one conversation, rendered by the chat template, instead of `input`
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "add_generation_prompt": {"type": "boolean", "description": "the chat form: open the assistant's turn "
                                                                      "after the messages (default false)"},
        "continue_final_message": {"type": "boolean", "description": "the chat form: leave the last message "
                                                                       "open"},
        "chat_template_kwargs": {"type": "object", "description": "the chat form: extra template variables"}})
    schema["properties"]["input"] = EMBEDDINGS_INPUT
    return {**schema, "anyOf": [{"required": ["input"]}, {"required": ["messages"]}]}


EMBEDDINGS = {
    "summary": "OpenAI embeddings: the mean of the model's final hidden states (serve/embeddings.py)",
    "requestBody": {"required": True, "content": {"application/json": {"schema": _embeddings_request()}}},
    "responses": {"200": {"description": "one embedding per input", "content": {"application/json": {"schema": {
        "type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"]}},
            "model": {"type": "string"}, "usage": {"type": "object"}}}}}},
        **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "429", "500", "503")}}}


# vLLM's scoring routes (serve/scores.py): the cosine similarity of the texts' embeddings
TEXTS = {"oneOf": [{"type": "string", "minLength": 1},
                   {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": {"type": "string", "minLength": 1}}]}
_SCORING_COMMON = {"model": {"type": "string"}, "user": {"type": "string"}, "request_id": SAMPLING["request_id"],
                   "priority": SAMPLING["priority"]}


def _scoring(required: list[str], properties: dict) -> dict:
    schema = _request(None, {**_SCORING_COMMON, **properties})
    for name in required:                       # what the request scores is never null
        schema["properties"][name] = properties[name]
    return {**schema, "required": required}


SCORE = {
    "summary": "vLLM's score: the cosine similarity of each (text_1, text_2) pair's embeddings (serve/scores.py)",
    "requestBody": {"required": True, "content": {"application/json": {"schema": _scoring(
        ["text_1", "text_2"], {"text_1": TEXTS, "text_2": TEXTS})}}},
    "responses": {"200": {"description": "one score per pair", "content": {"application/json": {"schema": {
        "type": "object", "required": ["id", "object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"}, "id": {"type": "string"}, "created": {"type": "integer"},
            "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "score"],
                                                "properties": {"object": {"const": "score"},
                                                               "index": {"type": "integer"},
                                                               "score": {"type": "number"}}}},
            "model": {"type": "string"}, "usage": {"type": "object"}}}}}},
        **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "429", "500", "503")}}}

RERANK = {
    "summary": "vLLM's rerank (Jina's and Cohere's shape): the documents by the cosine similarity of their "
               "embeddings to the query's, best first (serve/scores.py)",
    "requestBody": {"required": True, "content": {"application/json": {"schema": _scoring(["query", "documents"], {
        "query": {"type": "string", "minLength": 1},
        "documents": {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS - 1, "items": {"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "object", "required": ["text"], "additionalProperties": False,
             "properties": {"text": {"type": "string", "minLength": 1}}}]}},
        "top_n": {"type": "integer", "minimum": 0, "description": "the best this many (0 or left out: every document)"},
        "return_documents": {"type": "boolean", "description": "each result carries its document (default true)"},
        "max_tokens_per_doc": {"type": "null", "description": "Cohere's: null only (a document is never cut)"}})}}},
    "responses": {"200": {"description": "the documents, best first", "content": {"application/json": {"schema": {
        "type": "object", "required": ["id", "model", "usage", "results"], "properties": {
            "id": {"type": "string"}, "model": {"type": "string"}, "usage": {"type": "object"},
            "results": {"type": "array", "items": {"type": "object", "required": ["index", "relevance_score"],
                                                   "properties": {"index": {"type": "integer"},
                                                                  "relevance_score": {"type": "number"},
                                                                  "document": {"type": "object"}}}}}}}}},
        **{k: ERRORS[k] for k in ("400", "404", "408", "413", "415", "429", "500", "503")}}}

def _body(route: dict) -> dict:
    return route["requestBody"]["content"]["application/json"]["schema"]


def _answer(route: dict) -> dict:
    return route["responses"]["200"]["content"]["application/json"]["schema"]


# SageMaker's one inference route, as vLLM serves it: the body's shape picks the API (serve/routes.py)
INVOCATIONS = {
    "summary": "SageMaker's inference route (vLLM's): a body with 'messages' is a chat completion, one with "
               "'prompt' a completion, one with 'input' an embedding, one with 'query' or 'documents' a rerank, "
               "one with 'text_1' or 'text_2' a score",
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [CHAT_REQUEST, COMPLETION_REQUEST, _embeddings_request(), _body(RERANK), _body(SCORE)]}}}},
    "responses": {
        "200": {"description": "the answer of the API the body picks (JSON), or with \"stream\": true "
                               "server-sent events ending in data: [DONE]",
                "content": {"application/json": {"schema": {"anyOf": [
                    CHAT_RESPONSE, COMPLETION_RESPONSE, _answer(EMBEDDINGS), _answer(RERANK), _answer(SCORE)]}},
                            "text/event-stream": {"schema": SSE_EVENT}}},
        **ERRORS,
    },
}
