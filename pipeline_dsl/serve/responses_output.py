"""The objects of a Responses API answer (serve/responses.py, serve/responses_events.py): the
`response` object, its message and function_call items, its usage."""
from __future__ import annotations

import uuid


def usage(u: dict, reasoning_tokens: int | None = None) -> dict:
    """OpenAI's ResponseUsage, every field its SDK requires: cache_write_tokens is 0, as agp writes no
    explicit cache entries (its prefix cache keeps a prompt's KV blocks by their tokens, unasked and
    unbilled); reasoning_tokens the tokens of the thinking agp serve --reasoning-parser splits out
    (answers.reasoning_tokens), 0 where none is (no parser: a <think> block stays in its text)."""
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u["cached_tokens"], "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens or 0},
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, status: str, logprobs: list | None, item_id: str | None = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"type": "message", "id": item_id or new_id("msg"), "status": status, "role": "assistant",
            "content": [part]}


def reasoning_item(text: str, item_id: str | None = None) -> dict:
    """A reasoning model's thinking (agp serve --reasoning-parser), as OpenAI's and vLLM's Responses API
    shape it: its text a `reasoning_text` part, no summary."""
    return {"type": "reasoning", "id": item_id or new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None, "status": "completed"}


def call_item(call: dict, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or new_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


# the finish reasons that leave a response incomplete, and the reason its incomplete_details give
# (OpenAI's two): the token budget cut it, or a guard stopped it (a python stage that sets its
# answer's finish_reason to "content_filter")
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def ending(finish_reason: str | None) -> tuple[str, dict | None]:
    """(status, incomplete_details) of a response whose answer ended for `finish_reason`."""
    reason = INCOMPLETE.get(finish_reason)
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def response_object(rid: str, call, created: int, status: str, output: list,
                    use: dict | None, error: dict | None = None, incomplete: dict | None = None) -> dict:
    """`incomplete`: an incomplete response's incomplete_details (ending)."""
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": call.req.model,
            "output": output, "error": error, "incomplete_details": incomplete, "usage": use, **call.settings}


def output_messages(output: list) -> list[dict]:
    """The answer's items as chat messages (what a later previous_response_id continues)."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i["type"] == "function_call"]
    message = {"role": "assistant", "content": text}
    thought = [p["text"] for item in output if item["type"] == "reasoning" for p in item["content"]]
    if thought:                                  # its chat template renders it as it renders thinking
        message["reasoning_content"] = "".join(thought)
    if calls:
        message["tool_calls"] = calls
    return [message]
