"""Python stages used by the example pipelines (`stage x : python { fn = "hooks:NAME" }`).

Each function gets one item as a plain dict and returns it (changed in place or new), a
label for `when LABEL` edges, or raises pipeline_dsl.Reject. A Request looks like
{"id", "messages" | "prompt", sampling fields, "metadata"}; a Generated result like
{"id", "text", "finish_reason", "usage", "request"}. A stream stage's function
(`stream = true`, guard_stream below) is a generator over the answer's chunks instead.
"""
from __future__ import annotations

import ast
import operator
import re
import threading
import time

from pipeline_dsl import Reject

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<!\w)\+?\d[\d ()-]{7,}\d(?!\w)")


def _texts(item: dict):
    """(getter, setter) pairs over the request's text: each message's content, or the prompt."""
    if item.get("messages") is not None:
        for m in item["messages"]:
            yield (lambda m=m: m["content"]), (lambda v, m=m: m.__setitem__("content", v))
    elif isinstance(item.get("prompt"), str):
        yield (lambda: item["prompt"]), (lambda v: item.__setitem__("prompt", v))


def redact_pii(item: dict) -> dict:
    """Before the model: e-mail addresses and phone numbers become [EMAIL] / [PHONE]."""
    found = 0
    for get, put in _texts(item):
        text, n1 = EMAIL.subn("[EMAIL]", get())
        text, n2 = PHONE.subn("[PHONE]", text)
        found += n1 + n2
        put(text)
    item.setdefault("metadata", {})["redacted"] = found
    return item


BLOCKED = ("password", "social security number")


def refuse_if_unsafe(text: str, blocked=BLOCKED) -> None:
    """Reject text that leaks contact details or talks about blocked topics."""
    if EMAIL.search(text) or PHONE.search(text):
        raise Reject("the answer contained contact details")
    lowered = text.lower()
    for word in blocked:
        if word.lower() in lowered:
            raise Reject(f"the answer mentions a blocked topic ({word})")


def guard_output(item: dict, blocked: list[str] = BLOCKED) -> dict:
    """After the model, on the whole answer: refuse it if it is unsafe (`blocked`: the topics it
    refuses; a stage sets its own with `args = {blocked = ["password"]}`)."""
    refuse_if_unsafe(item["text"], blocked)
    return item


HOLD = 64   # characters held back: a phone number or address split across chunks is whole before it is sent


def guard_stream(item: dict, chunks, blocked: list[str] = BLOCKED):
    """After the model, as it writes (stream = true): everything seen so far is checked at each
    chunk, and all but the last HOLD characters go on to the client at once, so the guard costs
    a few words of latency, not the whole answer. What was sent before a refusal stays sent."""
    seen, sent = "", 0
    for text in chunks:
        seen += text
        refuse_if_unsafe(seen, blocked)
        if len(seen) - sent > HOLD:
            yield seen[sent:len(seen) - HOLD]
            sent = len(seen) - HOLD
    yield seen[sent:]


# ---------------------------------------------------------------- a calculator tool

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Mod: operator.mod}
CALL = re.compile(r"CALC\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
ARITHMETIC = re.compile(r"\d[\d\s.]*(?:[-+*/%^]\s*\(?\s*[\d.]+\s*\)?\s*)+")


def evaluate(expression: str) -> float | int:
    """Arithmetic only (+ - * / % ** and parentheses), never arbitrary code."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Pow) and abs(ev(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")
    value = ev(ast.parse(expression.replace("^", "**"), mode="eval"))
    return int(value) if isinstance(value, float) and value.is_integer() else value


def calculator(item: dict):
    """A tool step after generate. First turn: the model either wrote CALC(expression) or the
    user's question holds arithmetic; the tool computes it, appends the exchange to the
    conversation and returns the request, which loops back to the model. Otherwise (or once
    the tool has answered) the result goes on to respond."""
    request = item["request"]
    messages = request.get("messages") or [{"role": "user", "content": request.get("prompt", "")}]
    if any(m["role"] == "tool" for m in messages):
        return item                                    # the tool has answered: this is the final answer
    call = CALL.search(item["text"])
    if call is None:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        call = ARITHMETIC.search(question)
    if call is None:
        return item
    expression = (call.group(1) if call.re is CALL else call.group(0)).strip()
    try:
        value = evaluate(expression)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as e:
        value = f"error: {e}"
    request = dict(request)
    request["messages"] = messages + [
        {"role": "assistant", "content": f"CALC({expression})"},
        {"role": "tool", "content": f"{expression} = {value}"},
        {"role": "user", "content": f"The calculator says {expression} = {value}. Tell me the result."},
    ]
    request.setdefault("metadata", {})["tool_result"] = str(value)
    return request


# ---------------------------------------------------------------- per-tenant rate limits

# tier -> (burst, requests per second): a token bucket per tenant (metadata.tenant)
RATE_LIMITS = {"free": (2, 0.5), "pro": (20, 10.0)}
PRIORITY = {"pro": 0, "free": 10}          # lower is admitted first (scheduling_policy = priority)
_buckets: dict = {}                        # tenant -> (tokens left, when counted)
_buckets_lock = threading.Lock()           # calls run on several worker threads at once


def rate_limit(item: dict) -> dict:
    """Before the batcher: refuse a tenant over its rate with a 429 and the seconds until its
    next request would pass (Retry-After); give the request its tier's priority."""
    metadata = item.get("metadata") or {}
    tenant = str(metadata.get("tenant", "anonymous"))
    tier = metadata.get("tier") if metadata.get("tier") in RATE_LIMITS else "free"
    burst, per_second = RATE_LIMITS[tier]
    now = time.monotonic()
    with _buckets_lock:
        tokens, then = _buckets.get(tenant, (burst, now))
        tokens = min(burst, tokens + (now - then) * per_second)
        if tokens < 1:
            _buckets[tenant] = (tokens, now)
            raise Reject(f"tenant {tenant!r} is over its rate limit of {per_second:g} requests a second",
                         status=429, retry_after=(1 - tokens) / per_second)
        _buckets[tenant] = (tokens - 1, now)
    item["priority"] = PRIORITY[tier]
    return item


# ---------------------------------------------------------------- a cascade of two engines

def finished(item: dict) -> str:
    """After the first engine: "unfinished" (to the second engine) when the answer was cut at
    max_new_tokens or is empty, else "finished" (the `otherwise` edge: the answer as it is)."""
    if item["finish_reason"] == "length" or not item["text"].strip():
        return "unfinished"
    return "finished"


def ask_again(item: dict) -> dict:
    """The request of an answer the first engine could not finish, for the second engine."""
    return item["request"]


# ---------------------------------------------------------------- map-reduce over a document's parts

def split_paragraphs(item: dict) -> list:
    """`returns = many`: one request per paragraph (blank-line separated) of the user's last
    message; each asks for a one-sentence summary. Settings the new requests leave out (max_tokens,
    temperature, metadata, ...) are the user's request's."""
    text = item["messages"][-1]["content"] if item.get("messages") else item.get("prompt", "")
    return [{"messages": [{"role": "user", "content": f"Summarise in one sentence: {part.strip()}"}]}
            for part in re.split(r"\n\s*\n", text) if part.strip()]


def combine_parts(results: list) -> dict:
    """The join after the paragraphs' summaries: one line each, in the paragraphs' order."""
    if not results:
        return {"text": "(nothing to summarise)"}
    return {"text": "\n".join(r["text"].strip() for r in results)}
