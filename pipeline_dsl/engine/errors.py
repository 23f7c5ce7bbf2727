"""Errors the engine raises for bad input.

`InputError` is a `ValueError`: the caller did something the engine cannot serve
(an empty prompt, a prompt longer than the context, a bad sampling value). Its message
says what is wrong and what would fix it; front ends turn it into a clean error line,
an HTTP 400, or exit status 2 — never a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request the engine refuses: the message says what is wrong; `code` (when set) names the
    kind of fault for front ends (OpenAI's error codes), `param` the request field at fault when
    it is not the prompt (a token id of `allowed_token_ids` outside the vocabulary)."""

    code: str | None = None

    def __init__(self, message: str = "", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:                   # else the class's own (ContextLengthError's)
            self.code = code


class ContextLengthError(InputError):
    """A prompt (or prompt + max_tokens) longer than the context or the prompt limit."""

    code = "context_length_exceeded"


def prompt_over_limit(tokens: int, limit: int, by: str = "requests.max_prompt_tokens") -> ContextLengthError:
    """A prompt of `tokens` tokens past the prompt limit `limit` that `by` set (the pipeline's
    requests.max_prompt_tokens, or a flag such as serve's --max-input-tokens); the engine and the
    flow runtime refuse it in the same words."""
    return ContextLengthError(f"prompt of {tokens} tokens {past_prompt_limit(limit, by)}")


def past_prompt_limit(limit: int, by: str) -> str:
    """How an error says a prompt (its tokens, or its characters) is past the prompt limit
    `limit` that `by` set: prompt_over_limit's words, and the engine's."""
    return f"is longer than this pipeline accepts ({limit_setting(limit, by)})"


def limit_setting(limit: int, by: str) -> str:
    """The setting of a limit as its user wrote it: a pipeline's `requests.max_prompt_tokens = 10`
    (or an EngineConfig field's `max_model_len = 10`), a flag as `--max-input-tokens 10`, an
    environment variable (in capitals) as `AGP_MAX_INPUT_TOKENS=10`."""
    if by.startswith("-"):
        return f"{by} {limit}"
    return f"{by}={limit}" if by.isupper() else f"{by} = {limit}"


class KVPoolError(InputError):
    """The KV pool its budget asks for cannot be allocated: more memory than the device has."""


class QueueFullError(InputError):
    """The engine's waiting queue is at `max_queue`; retry later (HTTP 429/503)."""


class ModelNotFoundError(InputError):
    """The model named in the pipeline cannot be found or read."""


class ModelFileError(ModelNotFoundError):
    """The model was found but its file or folder is broken: the message (one line) names
    the file at fault and what is wrong with it."""
