"""What flows through the runtime: items, the state of one request, its result, its error.

An `Item` is a Request or a Generated result (the port types of stages/builtin.py) on its
way through the graph; `RequestState` is what the runtime knows of one admitted request
(its live items, the answers that reached a respond stage, its engine sequences, usage);
a `Result` is what its listener hears once, at the end.
"""
from __future__ import annotations

import copy
import json
import math
import logging
import reprlib
import threading
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline_dsl import conditions as C
from pipeline_dsl.engine.config import RequestOutput

REQUEST, GENERATED = C.REQUEST, C.GENERATED
log = logging.getLogger("agp.flow")


class PipelineError(Exception):
    """Why one request failed. kind: invalid (its input), rejected (a Reject), queue_full,
    unavailable (shutting down, an engine failed, or a stage's call failed for a transient reason,
    code stage_unavailable: a ConnectionError, pipeline_dsl.Retry, ..., its retries spent),
    timeout (a stage's timeout passed), aborted (its client went away), failed (a user function or
    the engine failed); `code` names an input
    error more precisely (the engine's InputError.code: context_length_exceeded), `param` the
    request field at fault when it is not the prompt (InputError.param, or the one a Reject names);
    `status` and `retry_after` are what a Reject asked the client to get (a 4xx or 5xx, seconds to
    wait), as `code` and `param` are a Reject's own when it names them. What a front end answers
    for each is its own (agp serve: serve/errors.py)."""

    def __init__(self, message: str, kind: str = "failed", stage: str | None = None, code: str | None = None,
                 param: str | None = None, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.kind, self.stage, self.code, self.param = message, kind, stage, code, param
        self.status, self.retry_after = status, retry_after


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None
    data: dict                        # the Generated item as it reached respond
    # the index its deltas carried while it generated (a listener's on_delta), where that differs
    # from `index`: a choice streamed straight from its generate stage is numbered as it starts
    # there, and an answer sent whole is numbered again in branch order
    delta_index: int | None = None
    # the tool calls its generate stage read in its text (tools.ToolCallsRead, its `tool_calls`),
    # where its request gave tools: its front end reads them there again only where the text changed
    tool_read: Any = None


@dataclass
class Result:
    """A request's answer: its choices, or the error that failed it."""
    key: str
    id: Any                           # the request's own id
    choices: list[Choice]
    error: PipelineError | None
    usage: dict                       # prompt_tokens, completion_tokens, cached_tokens
    metrics: dict                     # arrival, ttft_s, latency_s
    # each engine's share of `usage` (keyed by engine name, as stats()["engines"]): the prompts it
    # took, the tokens it generated, the cached tokens it served. A cascade's draft counts on the
    # engine that drafted; what a python stage answered itself counts on none
    engine_usage: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def longest_choice_tokens(self) -> int | None:
        """The tokens generated for its longest choice, each choice counting its own generation
        (its `usage`): a vote's other candidates and an earlier stage's draft, which `usage`
        counts too, are not in the answer. None when a choice does not say (text a python stage
        wrote)."""
        counts = [(c.data.get("usage") or {}).get("completion_tokens") if isinstance(c.data, dict) else None
                  for c in self.choices]
        return max(counts) if counts and None not in counts else None

    def time_per_output_token(self, decode_s: float) -> float | None:
        """vLLM's TPOT of this answer over `decode_s` (first token to last): per token of its
        longest choice after the first; where a choice does not count its tokens, the usage shared
        by the choices. None for an answer of at most one token."""
        from pipeline_dsl.engine.config import time_per_output_token

        longest = self.longest_choice_tokens()
        if longest is not None:
            return time_per_output_token(decode_s, longest)
        return time_per_output_token(decode_s, self.usage.get("completion_tokens", 0), len(self.choices))


def no_usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}


@dataclass(eq=False)
class RequestState:
    """One admitted request (vLLM v1's RequestState, for a graph): the ledger keeps it."""
    key: str
    id: Any
    listener: Any
    arrival: float
    number: int = 0                   # admission order: engines admit what arrives together in it
    pin: str | None = None            # a generate stage the request asked for (agp serve's `model`)
    stream: bool = False
    # whether its listener hears deltas (it has an on_delta), read once as it is admitted: for
    # one that does not (agp run's), no Delta is made, nor its usage so far, token after token
    hears_deltas: bool = False
    items: set = field(default_factory=set)            # its live items, wherever they are
    results: list = field(default_factory=list)        # Generated items that reached a respond stage
    joins: dict = field(default_factory=dict)          # join stage -> waiting items (arrival order)
    seqs: dict = field(default_factory=dict)           # engine sequence id -> segment
    # whether a generate stage took it (a sequence on an engine, or an echo answered at once): an
    # answer of one that none took is a python stage's own (RequestLedger.answer)
    generated: bool = False
    done: bool = False
    paused: bool = False              # its reader asked its generation to wait (FlowRuntime.pause)
    next_index: int = 0
    usage: dict = field(default_factory=no_usage)
    engine_usage: dict = field(default_factory=dict)   # engine name -> its share of usage (Result.engine_usage)
    # streamed choice index -> (its completion tokens as last heard, its prompt's entry, cached
    # tokens) while its sequence generates; None once it ended (its tokens are in `usage`)
    streaming: dict = field(default_factory=dict)
    first_token: float | None = None
    timings: dict = field(default_factory=dict)        # its first generation's queue / prefill / decode s
    rejection: PipelineError | None = None             # a branch dropped by a join's on_reject = drop
    # join stage -> the first Reject of a branch dropped on its way there since the join last fired
    rejected_at: dict = field(default_factory=dict)
    # join stage -> (branch, request) of each item a `returns = many` stage spread there: the request
    # that stage got, which the join's merged result answers (its `request`)
    spread_from: dict = field(default_factory=dict)
    # its listener has its result (tell_result) and hears nothing more of it; `telling` is held
    # while the listener hears a delta or its prompt, so what is on its way when the request
    # ends (an abort from another thread) is heard before the result or not at all
    told: bool = False
    usage_told: dict | None = None                     # the usage of the last delta its listener heard
    # the exception its listener raised hearing a delta: it hears no more deltas, and its result
    # is the error saying its answer could not be built (unbuilt)
    listener_failed: BaseException | None = None
    telling: Any = field(default_factory=threading.RLock, repr=False)


@dataclass(eq=False)
class Item:
    kind: str                          # REQUEST | GENERATED
    data: dict
    req: RequestState
    at: str | None = None              # the stage it is at or heading to
    branch: tuple = ()
    turns: dict = field(default_factory=dict)
    label: str | None = None
    index: int | None = None           # its choice index when it streams
    ids: tuple | None = None           # (fingerprint, token ids) cached by prompt_tokens / tokenise
    entry: dict | None = None          # the segment entry it came from (usage of shared prompts)
    submitted: float | None = None     # perf_counter() when its sequence went to an engine (trace)
    logprobs: list | None = None       # per generated token, when the request asked for them
    token_ids: list | None = None      # the tokens generated so far, when the request asked (return_token_ids)
    queued: bool = False               # sent to `at` and not yet taken up there
    live: Any = None                   # streams.Live while stream stages filter its text as it comes
    sampled: frozenset = frozenset()   # generate stages that made this branch's `n` copies already
    split: bool = False                # one of several copies a generate stage made: never split again
    copy: int = 0                      # which of those copies: sampled again elsewhere with seed + copy
    tool_read: Any = None              # the tool calls its generate stage read (Choice.tool_read)
    constrained: tuple | None = None   # (generate stage, whether it holds its answer to a constraint): Delta's
    # stands at a join for the results a `returns = many` stage's empty list did not make: the join
    # fires for it (with no results) once nothing else can reach it; never one of the request's items
    hollow: bool = False

    def fork(self, branch: tuple) -> "Item":
        return Item(self.kind, copy.deepcopy(self.data), self.req, self.at, branch, dict(self.turns),
                    self.label, None, self.ids, self.entry, sampled=self.sampled, split=self.split,
                    copy=self.copy, tool_read=self.tool_read)


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be sent as UTF-8 (a lone UTF-16 surrogate, which user code can make and
    no answer can carry), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone UTF-16 surrogate at {e.start}"
    return None


WRITTEN_AS_IS = ("stop_reason", "generated_by", "branches")   # result fields an answer carries unformatted
COUNTED = ("prompt_tokens", "completion_tokens", "cached_tokens")  # a result's usage: what the run adds up
# the counts a result's usage may carry, held to non-negative integers: COUNTED and the thinking's
# tokens (--reasoning-parser), which an answer's usage sums over its choices
USAGE_COUNTS = (*COUNTED, "reasoning_tokens")
MAX_COUNT = 2 ** 53 - 1               # the largest token count every JSON reader (and a float metric) holds exactly
# the code of a request whose result its listener could not make an answer of (unbuilt)
ANSWER_FAILED_CODE = "answer_failed"
# the code of a request a stage's call failed for a transient reason (a service it calls down or busy)
STAGE_UNAVAILABLE_CODE = "stage_unavailable"


def check_result(d: dict, stage: str, made: str, got: dict | None = None, vocab: int | None = None) -> None:
    """A result dict user code made (`made`: "stage 'a' returned", "join 'j' produced"), held to
    what an answer needs: its text a string that can be sent, its finish_reason a string (a guard
    may set its own, e.g. content_filter) or null, its usage an object whose token counts are
    non-negative integers (the run's counts and TPOT add them up), what an answer carries as
    it is plain JSON, and its token fields (TOKEN_FIELDS) in the engine's shapes, their token
    ids of the vocabulary of `vocab` ids the answer reads them with (None: any). `got`: the
    result the code was given (a python stage's), whose token fields were checked already (or
    the engine made them): a field equal to its own is not looked at again. Else a
    PipelineError that fails its request at `stage`."""
    text, reason, usage = d.get("text"), d.get("finish_reason"), d.get("usage")
    if not isinstance(text, str):
        raise PipelineError(f"{made} a result whose text is {a_type(text)}, not a string", "failed", stage)
    problem = unicode_problem(text)
    if problem is not None:
        raise PipelineError(f"{made} a result whose text is not valid Unicode ({problem})", "failed", stage)
    if reason is not None and not isinstance(reason, str):
        raise PipelineError(f"{made} a result whose finish_reason is {a_type(reason)}; expected a string or null",
                            "failed", stage)
    if usage is not None:
        if not isinstance(usage, dict):
            raise PipelineError(f"{made} a result whose usage is {a_type(usage)}; expected an object of token "
                                f"counts ({', '.join(COUNTED)}) or null", "failed", stage)
        for key in USAGE_COUNTS:
            n = usage.get(key)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise PipelineError(f"{made} a result whose usage.{key} is {n!r}; expected a non-negative "
                                    "integer", "failed", stage)
            if n is not None and n > MAX_COUNT:
                shown = f"{n}" if n < 10 ** 30 else f"an integer of {len(str(n))} digits"
                raise PipelineError(f"{made} a result whose usage.{key} is {shown}; expected a non-negative "
                                    f"integer of at most {MAX_COUNT} (2**53 - 1)", "failed", stage)
    for key in WRITTEN_AS_IS:
        value = d.get(key)
        if value is None:
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise PipelineError(f"{made} a result whose {key} is not plain JSON ({type(e).__name__}: {e}), "
                                "and an answer carries it as it is", "failed", stage) from None
    for key in TOKEN_FIELDS:
        value = d.get(key)
        if value is None or (got is not None and _unchanged(value, got.get(key))):
            continue
        problem = token_field_problem(key, value, vocab)
        if problem is not None:
            raise PipelineError(f"{made} a result whose {problem}", "failed", stage)
    if d.get("prompt_logprobs") and not d.get("prompt_token_ids"):
        raise PipelineError(f"{made} a result with prompt_logprobs but no prompt_token_ids (the engine gives "
                            "both; an echoed prompt's first token is read there)", "failed", stage)


# the token fields of a result, as the engine gives them (flow/engines.py) and the answer builders
# read them (serve/token_fields.py, serve/protocol.py): a stage may rewrite them, in these shapes
TOKEN_FIELDS = ("logprobs", "prompt_logprobs", "prompt_token_ids", "token_ids")
_PAIRS = (tuple, list)
_ENTRY = "an object {token_id, logprob, top: [[token id, logprob], ...]}"
_shown = reprlib.Repr()
_shown.maxstring, _shown.maxother, _shown.maxlist, _shown.maxdict = 40, 40, 4, 4


def token_field_problem(key: str, value, vocab: int | None = None) -> str | None:
    """What is wrong with a result's token field `key` (TOKEN_FIELDS), in words that name the
    element ("logprobs[3].top[0] is 'x'; expected ..."), or None where it has the engine's shape:
    `token_ids` and `prompt_token_ids` lists of token ids (non-negative integers, each below
    `vocab` where it is given: an id outside the vocabulary has no text); `logprobs` a
    list of {token_id, logprob, top} per generated token, `top` a list of (token id, logprob)
    pairs (a JSON copy's [id, logprob] lists too); `prompt_logprobs` the same per prompt token,
    with its `rank` (an integer) where it gives one, and null for the first (nothing comes before
    it). Every element is looked at: a stage that rewrote a field pays for one pass over it,
    less than the copy of the item it was given."""
    end = vocab or math.inf
    if key in ("token_ids", "prompt_token_ids"):
        if not isinstance(value, (list, tuple)):
            return f"{key} is {a_type(value)}; expected a list of token ids (non-negative integers) or null"
        for i, t in enumerate(value):
            if not (_is_id(t) and t < end):
                return _id_problem(f"{key}[{i}]", t, vocab)
        return None
    if not isinstance(value, list):
        return f"{key} is {a_type(value)}; expected a list of {_ENTRY} per token, or null"
    prompt = key == "prompt_logprobs"
    for i, e in enumerate(value):
        if e is None and prompt and i == 0:
            continue
        where = f"{key}[{i}]"
        if not isinstance(e, dict):
            first = " (or null for the first)" if prompt else ""
            return f"{where} is {_shown.repr(e)}; expected {_ENTRY}{first}"
        t, lp, top = e.get("token_id"), e.get("logprob"), e.get("top")
        if not (_is_id(t) and t < end):
            return _id_problem(f"{where}.token_id", t, vocab)
        if not _is_number(lp):
            return f"{where}.logprob is {_shown.repr(lp)}; expected a number"
        if prompt and e.get("rank") is not None and not _is_id(e["rank"]):
            return f"{where}.rank is {_shown.repr(e['rank'])}; expected an integer or null"
        if not isinstance(top, (list, tuple)):
            return f"{where}.top is {_shown.repr(top)}; expected a list of [token id, logprob] pairs"
        for j, pair in enumerate(top):
            if type(pair) in _PAIRS and len(pair) == 2 and type(pair[0]) is int and 0 <= pair[0] < end \
                    and type(pair[1]) is float:
                continue                            # the engine's own (the loop over every alternative)
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_id(pair[0])
                    and _is_number(pair[1])):
                return f"{where}.top[{j}] is {_shown.repr(pair)}; expected a [token id, logprob] pair"
            if pair[0] >= end:
                return _id_problem(f"{where}.top[{j}][0]", pair[0], vocab)
    return None


def _id_problem(where: str, t, vocab: int | None) -> str:
    if _is_id(t):                                  # then it is past the vocabulary's end
        return f"{where} is {_shown.repr(t)}; expected a token id of the vocabulary (0..{vocab - 1})"
    return f"{where} is {_shown.repr(t)}; expected a token id (a non-negative integer)"


def _unchanged(value, before) -> bool:
    """Whether a token field is the one a stage was given: the same object, or an equal one of the
    same type (list == list: one comparison in C, no walk in Python). A value whose == does not
    answer yes or no (an array's) is not."""
    if value is before:
        return True
    if type(value) is not type(before):
        return False
    try:
        return (value == before) is True
    except Exception:                            # noqa: BLE001 - then it is walked and named
        return False


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def a_type(value) -> str:
    """'a dict', 'an int', 'bytes': a value's type in a sentence."""
    name = type(value).__name__
    return name if name == "bytes" else ("an " if name[0] in "aeiou" else "a ") + name


@dataclass(frozen=True)
class Delta(RequestOutput):
    """A delta as a request's listener hears it (`on_delta(key, index, delta)`): the engine's
    RequestOutput of the choice's sequence (its prompt_tokens, completion_tokens and
    cached_tokens are that sequence's), and `usage`, the request's usage so far
    (RequestLedger.usage_so_far): its prompts, the tokens of its generations that ended (an
    earlier generate stage's draft too) and of its streamed choices as heard so far, this
    one's included. It never goes down, and the last delta's is the result's usage.
    `generated_by`: the generate stage whose answer this is (the choice's `generated_by` once
    it ends), which tells the form its tool calls are written in (flow's tool_parser).
    `constrained`: its generate stage held it to a format or a forced tool call from its first
    token (the runtime's constrained(): the request's, a python stage's response_format, or the
    stage's json_schema), so it holds no thinking."""
    usage: dict = field(default_factory=no_usage)
    generated_by: str | None = None
    constrained: bool = False        # the answer is held to a format or forced call from its first token

    def without_text(self) -> "Delta":
        """The same delta with `text` (the whole text so far) "": what a listener that queues its
        deltas keeps, each one's delta_text alone. A dict copy, as cheap as the delta was to make."""
        return _copied(self, type(self), text="")


def _copied(source, cls, **values):
    """A `cls` (a frozen dataclass) with `source`'s fields and `values` set: one dict copy, not a
    getattr per field through the frozen dataclass's __init__ (a Delta per streamed token)."""
    made = object.__new__(cls)
    fields_of = source.__dict__.copy()
    fields_of.update(values)
    object.__setattr__(made, "__dict__", fields_of)
    return made


_OUTPUT_FIELDS = tuple(f.name for f in fields(RequestOutput))   # what a Delta copies of the engine's output


def heard(req: RequestState, index: int, out, usage: dict, generated_by: str | None = None,
          constrained: bool = False) -> bool:
    """Tell a request's listener about a delta of its choice `index`, written by generate stage
    `generated_by`, with the request's usage so far (every streamed token of every stream: an
    engine's RequestOutput is copied whole, a dict copy, not field by field through the frozen
    dataclass's __init__).
    Its caller skips a request whose listener hears no deltas (`req.hears_deltas`). Returns
    whether the listener failed on this delta (it hears no more, and its caller aborts the
    request: nothing of its generation would be heard)."""
    with req.telling:
        if req.told or req.listener_failed is not None:   # the request ended meanwhile (its result was
            return False                         # the last word), or its answer cannot be built
        if req.usage_told is not None:           # counted before the delta told last (n choices' stream
            usage = {k: max(n, req.usage_told.get(k, 0)) for k, n in usage.items()}   # stages: threads of
        req.usage_told = usage                   # their own): the usage heard never goes down
        if type(out) is RequestOutput:           # the engine's (or a stream stage's): its fields, copied at once
            delta = _copied(out, Delta, usage=usage, generated_by=generated_by, constrained=constrained)
        else:
            delta = Delta(**{name: getattr(out, name) for name in _OUTPUT_FIELDS}, usage=usage,
                          generated_by=generated_by, constrained=constrained)
        try:
            req.listener.on_delta(req.key, index, delta)
        except Exception as e:                   # noqa: BLE001 - a listener's failure is its own request's
            req.listener_failed = e
            log.exception("the answer to request %r could not be built (its listener failed on a delta); "
                          "it is answered with an error", req.id)
            return True
    return False


def tell_prompt(req: RequestState, ids: list, logprobs: list | None) -> None:
    """Tell a request's listener its prompt's ids (logprobs None), or its ids and their logprobs
    once the engine computed them; both before any token of the request is heard. A listener
    without `on_prompt` does not hear them (agp run's: the answer carries them)."""
    _tell_before_result(req, "on_prompt", ids, logprobs)


def tell_admitted(req: RequestState) -> None:
    """Tell a request's listener that an engine took it: the engine's checks passed (its prompt
    within the context, room in its queue) and its sequences wait in its queue, where their
    prefill and first token may still take long; before any of its tokens is heard. A listener
    without `on_admitted` does not hear it; one that does may hear it more than once (a request
    that enters another engine after the first: a fallback, a loop)."""
    _tell_before_result(req, "on_admitted")


def _tell_before_result(req: RequestState, hook: str, *args) -> None:
    """Call the listener's `hook` (when it has one) with the request's key and `args`, unless its
    result was told; its failure is its own."""
    tell = getattr(req.listener, hook, None)
    if tell is not None:
        with req.telling:
            if req.told:
                return
            try:
                tell(req.key, *args)
            except Exception:                    # noqa: BLE001 - a listener's failure is its own
                pass


def tell_result(req: RequestState, result: Result) -> None:
    """Tell a request's listener its result, once; a delta being heard (on another thread) is
    heard first, and none after it."""
    with req.telling:
        if req.told:
            return
        req.told = True
    if req.listener_failed is not None:          # logged when it failed
        result = unbuilt(result, req.listener_failed)
    deliver(req.listener, result)


def deliver(listener, result: Result) -> None:
    """Tell a listener its request's result. A listener that fails on it (a result it cannot make
    an answer of: agp serve's metrics or answer, agp run's output line) is logged once at ERROR
    with its traceback and the request's id, and told instead the error that says so (unbuilt:
    agp serve answers 500 answer_failed, agp run writes an error line), so its client does not
    wait for an answer that never comes; the other requests go on. A listener that fails on that
    error too is logged, its answer lost."""
    try:
        listener.on_done(result)
        return
    except Exception as e:                       # noqa: BLE001 - a listener's failure is its own request's
        if result.error is not None and result.error.code == ANSWER_FAILED_CODE:
            log.exception("the error of request %r could not be handed over; its answer is lost", result.id)
            return
        log.exception("the answer to request %r could not be built; it is answered with an error", result.id)
        failed = unbuilt(result, e)
    try:
        listener.on_done(failed)
    except Exception:                            # noqa: BLE001 - as above
        log.exception("the error of request %r could not be handed over either; its answer is lost", result.id)


def unbuilt(result: Result, e: BaseException) -> Result:
    """`result` failed: its answer could not be built of it (`e`, a bug or a value no stage
    checked)."""
    return failed_with(result, unbuilt_error(e))


def failed_with(result: Result, error: PipelineError) -> Result:
    """`result` failed with `error`, found as its answer was made of it (the pipeline answered it).
    No choices and no usage (what failed may be in them)."""
    return Result(result.key, result.id, [], error, no_usage(), dict(result.metrics or {}), {})


def unbuilt_error(e: BaseException) -> PipelineError:
    """The error of a request whose answer could not be built of its result (`e`); agp serve's
    500 says the same (serve/errors.py's answer_failed)."""
    return PipelineError(f"the answer to this request could not be built ({type(e).__name__}: {e}); its traceback "
                         "is logged", "failed", code=ANSWER_FAILED_CODE)
