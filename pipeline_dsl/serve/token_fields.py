"""vLLM's token-level fields of completions and chat: `prompt_logprobs`, `allowed_token_ids` and
`return_token_ids` — what a request asks, and the pieces of the answer in vLLM's shapes.

    asked = parse_token_fields(body, stream=False)   # APIError (400) naming the field
    asked.fields             # what the pipeline's items carry (allowed_token_ids, return_token_ids)
    asked.prompt_logprobs    # alternatives the answer lists per prompt token, or None

- `prompt_logprobs` (0 .. MAX_LOGPROBS): the engine computes the prompt's logprobs as it prefills
  it (engine/prompt_outputs.py, the path `echo` + `logprobs` takes). The answer's
  `prompt_logprobs` is a list with one entry per prompt token: null for the first (nothing comes
  before it), then `{"<token id>": {"logprob", "rank", "decoded_token"}}` holding the prompt's own
  token (its rank: 1 + the tokens the model found likelier) and the k most likely (ranks 1 .. k).
  Completions put it on each choice, chat at the top of the answer. vLLM's -1 (every token of the
  vocabulary) is a 400 here, as it is in vLLM past its max_logprobs (20 by default); so is a value
  above 0 on a stream (vLLM's rule); 0 on a stream comes on the first chunk of each choice.
- `allowed_token_ids`: only these tokens may be sampled (the engine's mask, processors.py).
- `return_tokens_as_token_ids`: the logprobs name each token "token_id:N" instead of its text
  (`token_text`), in chat and completions, streamed and whole, so a token that is no text of its
  own (part of a character) is still told apart.
- `return_token_ids` (vLLM >= 0.10.2): completions choices carry `prompt_token_ids` and
  `token_ids`; chat answers `prompt_token_ids`, their choices `token_ids`. Streamed: the prompt's
  ids on the first chunk of each choice (chat: at the top of the chunk that opens it), each later
  chunk the ids of its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline_dsl.engine.config import MAX_LOGPROBS
from pipeline_dsl.requests_io import shown
from stages.fields import TOKEN_ID_FIELDS, ParamError, check_token_ids

from .api_error import APIError

FIELDS = ("prompt_logprobs", "return_token_ids", "return_tokens_as_token_ids", *TOKEN_ID_FIELDS)
FLOOR = -9999.0            # what a logprob of -inf is sent as (JSON has no infinity; vLLM's value)


@dataclass
class TokenFields:
    fields: dict = field(default_factory=dict)
    prompt_logprobs: int | None = None


def parse_token_fields(obj: dict, *, stream: bool) -> TokenFields:
    out = TokenFields()
    k = obj.get("prompt_logprobs")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < -1 or k > MAX_LOGPROBS:
            raise APIError(f"'prompt_logprobs' must be an integer from 0 to {MAX_LOGPROBS}, not {shown(k)}",
                           param="prompt_logprobs", quoted=(shown(k),))
        if k == -1:
            raise APIError("'prompt_logprobs' = -1 asks for every token of the vocabulary at each prompt "
                           f"position; agp lists at most {MAX_LOGPROBS} (give 0 to {MAX_LOGPROBS})",
                           param="prompt_logprobs")
        if stream and k > 0:
            raise APIError("'prompt_logprobs' above 0 is not available with \"stream\": true (as in vLLM); "
                           "0 streams each prompt token's own logprob on the first chunk", param="prompt_logprobs")
        out.prompt_logprobs = k
        out.fields["prompt_logprobs"] = k
    for name in TOKEN_ID_FIELDS:
        if obj.get(name) is not None:
            try:
                out.fields[name] = list(check_token_ids(name, obj[name]))
            except ParamError as e:
                raise APIError(str(e), param=e.field, quoted=e.quoted) from None
    for name in ("return_token_ids", "return_tokens_as_token_ids"):
        want = obj.get(name)
        if want is not None and not isinstance(want, bool):
            raise APIError(f"'{name}' must be true or false, not {shown(want)}", param=name, quoted=(shown(want),))
        if want:
            out.fields[name] = True
    return out


def logprob_names(text_of, fields: dict):
    """How a request's logprobs name each token: its text (`text_of`), or "token_id:N" when it asked
    for return_tokens_as_token_ids (vLLM's names; a chat entry's `bytes` stay the token's own,
    and text_offset still counts the answer's characters)."""
    return _as_token_id if fields.get("return_tokens_as_token_ids") else text_of


def _as_token_id(token_id: int) -> str:
    return f"token_id:{token_id}"


def _logprob(value: float, rank: int | None, text: str) -> dict:
    return {"logprob": max(value, FLOOR), "rank": rank, "decoded_token": text}


def prompt_logprobs_json(entries: list | None, k: int, text_of) -> list:
    """vLLM's `prompt_logprobs` from the engine's entries (None, then {"token_id", "logprob",
    "rank", "top"} per prompt token): the prompt's own token first, then the k most likely; a
    token of both keeps its place and takes its rank among the k (vLLM's dict does the same)."""
    out: list = []
    for e in entries or ():
        if e is None:
            out.append(None)
            continue
        one = {str(e["token_id"]): _logprob(e["logprob"], e.get("rank"), text_of(e["token_id"]))}
        for rank, (t, lp) in enumerate(e["top"][:k], 1):
            one[str(t)] = _logprob(lp, rank, text_of(t))
        out.append(one)
    return out


def answer_fields(data: dict, asked_k: int | None, want_ids: bool, text_of) -> tuple[dict, dict]:
    """(what a completions choice adds, what a chat answer adds at its top) of one answer's data
    (the Generated item): prompt_logprobs and prompt_token_ids where the request asked for them."""
    prompt: dict = {}
    if asked_k is not None:
        prompt["prompt_logprobs"] = prompt_logprobs_json(data.get("prompt_logprobs"), asked_k, text_of)
    if want_ids:
        prompt["prompt_token_ids"] = list(data.get("prompt_token_ids") or ())
    return prompt, {"token_ids": list(data.get("token_ids") or ())} if want_ids else {}
