"""The runtime's side of its engine segments: tokenising, entering a segment, the engines'
outputs, and the tokenizer facts agp serve asks for.

A part of PipelineRuntime (flow/runtime.py), in a file of its own: it shares the runtime's
state (segments, ledger, counters, lock). A Request that reaches a batcher is tokenised
here (encode's work, off the engine's loop), routed among the segment's generate stages,
copied `n` times and submitted; each finished sequence becomes a Generated item that goes
on from its generate stage. Everything goes through EngineSegment's public methods.
"""
from __future__ import annotations

import collections
import copy
import time
from typing import Callable

from .items import GENERATED, REQUEST, Item, PipelineError, heard, tell_admitted, tell_prompt


class EngineSide:
    """PipelineRuntime's side of its engine segments (mixed into it)."""

    # ---- set-up helpers ----------------------------------------------------------------
    def _prompt_segment(self):
        """The engine whose tokenizer counts `prompt_tokens`: the first whose model is the pipeline's."""
        if not self.segments:
            return None
        model = self.graph.graph.get("settings", {}).get("model")
        for es in self.segments:
            if es.model_ref == model:
                return es
        return self.segments[0]

    def _first_segments(self) -> list | None:
        """The engine segments a request meets first, where nothing before them can change its
        prompt or answer it without one: from the request source through route stages and
        system_prompt stages that only add a system message (the prompt can only grow) to the
        batchers. None where another stage lies on the way (a python stage may rewrite the
        prompt, a respond stage answer it without an engine), or there is no source."""
        if self.source is None:
            return None
        todo, seen, first = [self.source], {self.source}, []
        while todo:
            for nxt, _ in self.router.routes[todo.pop()]:
                if nxt in seen:
                    continue
                seen.add(nxt)
                kind = self.kind[nxt]
                if nxt in self.seg_by_batch:
                    first.append(self.seg_by_batch[nxt])
                elif kind == "route" or (kind == "system_prompt" and not self.params[nxt].get("override")):
                    todo.append(nxt)
                else:
                    return None
        return first or None

    def check_prompt_length(self, data: dict) -> None:
        """PipelineError (invalid) for a request whose prompt is too long for every engine it can
        reach, decided from its characters (or its ids' count) without tokenising it, before it is
        admitted: a full queue's 429 never hides it. Only where the prompt reaches those engines as
        sent (_first_segments; else the engine that tokenises it refuses it), and not under
        truncate_prompt_tokens (the engine keeps its last tokens)."""
        def check(es):
            self._as_length_refusal(es, lambda: es.check_prompt_length(data))

        self._one_may_take(data, check)

    def check_fits(self, data: dict) -> None:
        """PipelineError (invalid) for a request that can never run: its prompt, tokenised as each
        engine it reaches first tokenises it, too long for all of them, alone or with the
        max_tokens it asks for (what their admission refuses it for, EngineSegment.check_fits).
        For a request the queue has no room for: its 400 is the answer, never a 429 its client
        would retry forever. It tokenises the prompt (a conversation rendered by its chat
        template; one too long by its characters is refused first, as its admission refuses it),
        unless its text's bytes already fit (EngineSegment.prompt_tokens_at_most: a batch of
        prompts behind a full queue's 429 is not tokenised again on each retry): call it off an
        event loop. Only where the prompt reaches those engines as sent
        (_first_segments; else the engine that tokenises it refuses it at its admission)."""
        from pipeline_dsl.engine.errors import InputError

        def check(es):                        # as its admission: _ids, then EngineSegment.check_fits (an
            # entry of a batch behind the one the queue refused was never submitted: its length unchecked)
            self._as_length_refusal(es, lambda: es.check_prompt_length(data))
            most = es.prompt_tokens_at_most(data)
            if most is not None:              # it fits at its most tokens: it fits, untokenised
                try:
                    es.check_fits(most, data)
                    return
                except InputError:
                    pass                      # it may not fit: its tokens tell
            try:
                ids = es.tokenise(data)
            except InputError as e:
                raise PipelineError(f"cannot tokenise the request: {e}", "invalid", es.segment.encode,
                                    e.code, e.param) from None
            self._as_length_refusal(es, lambda: es.check_fits(len(ids), data))

        self._one_may_take(data, check)

    def _one_may_take(self, data: dict, check) -> None:
        """`check(es)` (raising PipelineError) over the engines the request reaches first: none
        when one of them may take it, else the first one's refusal."""
        if self.first_segments is None or data.get("truncate_prompt_tokens"):
            return
        refusals = []
        for es in self.first_segments:
            try:
                check(es)
            except PipelineError as e:
                refusals.append(e)
            else:
                return                        # one of them may take it
        raise refusals[0]

    def _as_length_refusal(self, es, check) -> None:
        """`check()`'s InputError as the PipelineError that refuses a prompt too long for `es`."""
        from pipeline_dsl.engine.errors import InputError

        try:
            check()
        except InputError as e:
            raise PipelineError(str(e), "invalid", self._length_stage(es, es.segment.encode),
                                e.code, e.param) from None

    def _segment_for(self, pin: str | None):
        es = self.seg_of_gen.get(pin) if pin else self.prompt_segment
        if es is None:
            raise PipelineError("this pipeline has no model to tokenise with", "invalid")
        return es

    def tokenise(self, request: dict, pin: str | None = None) -> list[int]:
        """A prompt or a conversation as the engine would see it (agp serve's /tokenize)."""
        from pipeline_dsl.engine.errors import InputError

        es = self._segment_for(pin or request.get("pin"))
        try:
            return es.prompt_ids(request)
        except InputError as e:
            raise PipelineError(str(e), "invalid", code=e.code, param=e.param) from None

    def token_strings(self, ids: list[int], pin: str | None = None) -> list[str]:
        """The vocabulary's string of each id (agp serve's /tokenize `return_token_strs`)."""
        tok = self._segment_for(pin).tokenizer
        return [tok.id_to_token(t) or "" for t in ids]

    def token_text(self, pin: str | None = None) -> Callable[[int], str]:
        """id -> the text of that one token (for logprobs), cached."""
        import functools

        tok = self._segment_for(pin).tokenizer
        return functools.lru_cache(maxsize=1 << 16)(tok.token_text)

    def token_bytes(self, pin: str | None = None) -> Callable[[int], bytes]:
        """id -> the bytes of that one token (chat logprobs' `bytes`: part of a character too), cached."""
        import functools

        tok = self._segment_for(pin).tokenizer
        return functools.lru_cache(maxsize=1 << 16)(tok.token_bytes)

    def bytes_decoder(self, pin: str | None = None) -> Callable[[], object]:
        """-> a new incremental decoder of tokens' bytes that reads them as the tokenizer's text
        does (a stray byte of a SentencePiece answer is one U+FFFD, of a byte-level one as Python's
        "replace" reads it), for counting where each token's text begins."""
        return self._segment_for(pin).tokenizer.bytes_decoder

    def special_token_ids(self, pin: str | None = None) -> frozenset:
        """The ids of the tokenizer's special tokens (an answer's text leaves them out unless
        the request's skip_special_tokens is false)."""
        return getattr(self._segment_for(pin).tokenizer, "special_ids", frozenset())

    def sampling_defaults(self, pin: str | None = None) -> dict | None:
        """The temperature and top_p a request that leaves them out runs with: the pinned generate
        stage's, or the only one's; None when several generate stages could answer it."""
        gens = [pin] if pin else list(self.seg_of_gen)
        if len(gens) != 1 or gens[0] not in self.seg_of_gen:
            return None
        d = self.seg_of_gen[gens[0]].defaults[gens[0]]
        return {"temperature": d.temperature, "top_p": d.top_p}

    def detokenise(self, ids: list[int], pin: str | None = None) -> str:
        es = self._segment_for(pin)
        vocab = es.vocab_size
        bad = [t for t in ids if vocab and t >= vocab]
        if bad:
            raise PipelineError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "invalid")
        return es.tokenizer.decode(ids, skip_special_tokens=False)

    def vocab_of(self, pin: str | None, gen=None) -> int | None:
        """How many ids the vocabulary has that a result's token ids are read with (its answer's
        logprobs, token text, echo): the model's of generate stage `gen` (its `generated_by`) where
        that names one, else of the pinned stage `pin`, else the pipeline's model's; None where
        there is no model (nothing reads them as text)."""
        es = self.seg_of_gen.get(gen) if isinstance(gen, str) else None
        es = es or (self.seg_of_gen.get(pin) if pin else self.prompt_segment)
        return (es.vocab_size or None) if es is not None else None

    def request_vocab(self, pin: str | None) -> int | None:
        """How many ids a request's prompt_token_ids may take: the pinned stage's model's
        vocabulary, else the largest of the pipeline's models' (which of them tokenises an
        unpinned request is told later, on its way); None where there is no model."""
        if pin:
            return self.vocab_of(pin)
        sizes = [es.vocab_size for es in self.segments]
        return max(sizes) if sizes and all(sizes) else None

    def tokenizer_info(self, pin: str | None = None) -> dict:
        """The tokenizer's configuration (agp serve's /tokenizer_info, vLLM's shape: transformers'
        reading of the tokenizer's config, each token as its text): its special tokens (bos, eos,
        pad and unk, null where it has none; sep, cls and mask where it names them; a model's own
        named ones, image_token, in model_specific_special_tokens), its added tokens by id
        (added_tokens_decoder), whether it adds the bos token, the context length and the chat
        template."""
        es = self._segment_for(pin)
        tok = es.tokenizer
        special = dict(getattr(tok, "special_tokens", None) or {})
        named = {k: special.pop(k) for k in ("sep_token", "cls_token", "mask_token") if k in special}
        added = getattr(tok, "added", None) or {}
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": special.pop("pad_token", None), "unk_token": special.pop("unk_token", None), **named,
                **({"model_specific_special_tokens": special} if special else {}),
                "added_tokens_decoder": {str(i): text for i, text in sorted(added.items())},
                "add_bos_token": bool(getattr(tok, "add_bos", False)), "model_max_length": es.max_model_len,
                "chat_template": tok.chat_template}

    def tool_parser(self, pin: str | None = None, tool_choice=None) -> str:
        """The form the model of generate stage `pin` (else the pipeline's) writes tool calls in
        (pipeline_dsl/tools.py's PARSERS): the one agp serve --tool-call-parser names, else told
        from its chat template and vocabulary; hermes (agp's own prompt's) with no model, and
        for a request whose `tool_choice` forced a call (the constrained decoder writes that form)."""
        from pipeline_dsl.tools import answer_parser

        return answer_parser(self._family(pin), tool_choice)

    def _family(self, pin: str | None) -> str:
        """The form generate stage `pin`'s model writes calls in, told once a stage (its template,
        vocabulary and --tool-call-parser are fixed at load)."""
        from pipeline_dsl.tools import tool_parser_for

        family = self.tool_families.get(pin)
        if family is None:
            if self.tool_call_parser not in (None, "auto"):
                family = self.tool_call_parser
            else:
                es = self.seg_of_gen.get(pin) if pin else None
                es = es or self.prompt_segment or (self.segments[0] if self.segments else None)
                tok = getattr(es, "tokenizer", None)
                template = getattr(tok, "tool_template", None) or getattr(tok, "chat_template", None)
                family = "hermes" if tok is None else tool_parser_for(template, _Tokens(tok))
            self.tool_families[pin] = family
        return family

    def keeps_markers(self, gen: str, request: dict) -> bool:
        """Whether generate stage `gen` answers `request` with special tokens' text kept: it gives
        tools, its model writes calls after markers that are special tokens of its vocabulary
        (Mistral's `[TOOL_CALLS]`, Llama's `<|python_tag|>`), and it leaves skip_special_tokens to
        agp, as vLLM's adjustment overrides the default alone. The parser then sees the marker;
        the answer's content never shows it (pipeline_dsl/tools.py)."""
        from pipeline_dsl.tools import keeps_markers

        if not request.get("tools") or request.get("skip_special_tokens") is not None:
            return False
        choice = request.get("tool_choice", "auto")
        tok = getattr(self.seg_of_gen.get(gen), "tokenizer", None)
        return tok is not None and keeps_markers(self.tool_parser(gen, choice), choice, _Tokens(tok, special=True))

    def constrained(self, gen, request: dict) -> bool:
        """Whether generate stage `gen`'s answer to `request` (the dict the stage got: a python
        stage before it may have set its response_format) is held to a format or a forced tool call
        from its first token: the request's, or the stage's json_schema. False where `gen` names no
        generate stage."""
        es = self.seg_of_gen.get(gen) if isinstance(gen, str) else None
        return es is not None and isinstance(request, dict) and es.constraint_spec(gen, request) is not None

    def model_names(self) -> list[str]:
        """The generate stages a request may pin (agp serve's `model` field)."""
        return list(self.seg_of_gen)


    def _prompt_tokens(self, item: Item, stage: str) -> int:
        es = self.prompt_segment
        if es is None:
            text = item.data.get("prompt") or " ".join(m.get("content", "") for m in item.data.get("messages", []))
            return len(text.split())          # no model in this pipeline: words
        return len(self._ids(item, es, stage, "prompt_tokens"))

    def _ids(self, item: Item, es, stage: str, part: str = "tokenise") -> list[int]:
        """The item's prompt ids under segment `es` (cached while the prompt is unchanged); bad
        input fails at `stage`."""
        from pipeline_dsl.engine.errors import InputError

        d = item.data
        try:                                   # a prompt too long for any tokenisation: refused at once
            if not d.get("truncate_prompt_tokens"):
                es.check_prompt_length(d)
        except InputError as e:
            raise PipelineError(str(e), "invalid", self._length_stage(es, stage), e.code, e.param) from None
        fingerprint = (id(es), repr(d.get("messages") if d.get("messages") is not None
                                    else d.get("prompt_token_ids") if d.get("prompt_token_ids") is not None
                                    else d.get("prompt")), repr(d.get("tools")), repr(d.get("tool_choice")),
                       repr(d.get("chat_template_kwargs")), d.get("add_generation_prompt"),
                       d.get("continue_final_message"), d.get("truncate_prompt_tokens"), d.get("add_special_tokens"))
        if item.ids is not None and item.ids[0] == fingerprint:
            return item.ids[1]
        t0 = time.perf_counter()
        try:
            ids = es.tokenise(item.data)
        except InputError as e:               # the engine's word for bad input (tokenizer, template, length)
            raise PipelineError(f"cannot tokenise the request: {e}", "invalid", stage, e.code, e.param) from None
        self._span(stage, part, t0, item)
        item.ids = (fingerprint, ids)
        return ids

    def _length_stage(self, es, stage: str) -> str:
        """Where a prompt too long is refused: the request source when a prompt limit
        (requests.max_prompt_tokens, or the flag that overrides it) is the limit, else `stage`
        (the model's context is the limit)."""
        return (self.source or stage) if es.config.max_prompt_tokens else stage

    # ---- engine segments -----------------------------------------------------------------
    def _enter_segment(self, item: Item, es) -> None:
        """A Request reaches a batcher: tokenise, pick generate stage(s), copy n times, submit."""
        from pipeline_dsl.engine.errors import InputError

        seg, req = es.segment, item.req
        priority = item.data.get("priority") or 0
        try:                                  # the batcher's to honour: refused there, before tokenising
            es.check_priority(priority)
        except InputError as e:
            raise PipelineError(str(e), "invalid", seg.batch, e.code, e.param) from None
        with self._lock:
            if req.done:
                return
            self.flow.edge(seg.batch, seg.encode, queue=False)
            item.at = seg.encode
        t0 = time.perf_counter()
        ids = self._ids(item, es, seg.encode)
        limit = es.config.max_prompt_tokens
        if limit and len(ids) > limit:          # the prompt limit: refused at the request source, in its name
            from pipeline_dsl.engine.errors import prompt_over_limit

            err = prompt_over_limit(len(ids), limit, es.config.prompt_limit_by)
            raise PipelineError(str(err), "invalid", self._length_stage(es, seg.encode), err.code)
        self._observe(seg.encode, t0, item, span=False)
        with self._lock:
            if req.done:                      # it ended while tokenised (unlocked): dropped at encode
                return
            self.flow.edge(seg.encode, seg.kv, queue=False)
            item.at = seg.kv
        targets = self.router.choose(seg.kv, REQUEST, self._fields(item, seg.kv), None, req.pin)
        if not targets:
            raise PipelineError(f"stage '{seg.kv}': no generate stage takes this request", "failed", seg.kv)
        entry = {"prompt_tokens": len(ids), "cached_tokens": None}
        if item.data.get("return_token_ids"):              # the answer carries the prompt's ids: a stream
            entry["prompt_token_ids"] = list(ids)           # sends them before any token
            tell_prompt(req, entry["prompt_token_ids"], None)
        if item.data.get("prompt_logprobs") is not None:    # the engine scores the prompt chunk by chunk
            entry["prompt_token_ids"] = list(ids)           # as it prefills it (_on_outputs hears them)
        elif item.data.get("max_tokens") == 0 and item.data.get("pooling") is None:   # echo only: nothing to compute
            self._answer_without_engine(item, es, targets, ids, entry)
            return
        copies = []                                         # (target index, generate stage, copy, params)
        for g_i, gen in enumerate(targets):
            # a Request looping back to a generate stage, or one copy of n going on to another
            # generate stage (a fallback model), continues its own branch: sampled once, not n
            # times again (n on every pass would be n ** turns sequences of one request); copy i
            # of n keeps its seed + i there, so n copies falling back together stay n samples
            once = gen in item.sampled or item.split
            keep = self.keeps_markers(gen, item.data)       # the same for every copy of the request
            for i in ([item.copy] if once else range(es.copies(gen, item.data))):
                data = item.data if not copies else copy.deepcopy(item.data)
                try:
                    copies.append((g_i, gen, i, data, es.sampling(gen, data, len(ids), copy=i, keep_special=keep)))
                except InputError as e:
                    with self._lock:                        # the copy reached gen and was refused there
                        if req.done:
                            return
                        self.flow.edge(seg.kv, gen, queue=False)
                        item.at = gen
                    raise PipelineError(str(e), "invalid", gen, e.code, e.param) from None
        submits = []
        with self._lock:
            if req.done:
                return
            self.ledger.count(req, es.name, "prompt_tokens", len(ids))
            req.generated = True
            per_target = collections.Counter(c[0] for c in copies)     # copies each target makes
            for g_i, gen, i, data, params in copies:
                several = per_target[g_i] > 1
                branch = item.branch + ((g_i,) if len(targets) > 1 else ()) + ((i,) if several else ())
                split = item.split or several
                child = Item(REQUEST, data, req, gen, branch, dict(item.turns), None, None, item.ids, entry,
                             sampled=item.sampled | {gen}, split=split, copy=i)
                if self.streams.direct[gen]:
                    child.index = req.next_index
                    req.next_index += 1
                child.submitted = time.perf_counter()
                seq_id = self.ledger.bind(child, es)
                req.items.add(child)
                self.flow.edge(seg.kv, gen, queue=False)
                submits.append((seq_id, params, (req.number, len(submits))))
            req.items.discard(item)
        for seq_id, params, order in submits:
            es.submit(seq_id, ids, params, order, priority)
        with self._lock:
            ended, paused = req.done, req.paused
        if ended:           # it ended while its sequences were handed over: its abort came first
            for seq_id, _, _ in submits:
                es.abort(seq_id)
        elif paused:        # its reader asked it to wait (pause): these wait too
            self._park_as_paused(req, [(seq_id, es) for seq_id, _, _ in submits], True)

    def _answer_without_engine(self, item: Item, es, targets: list, ids: list, entry: dict) -> None:
        """max_tokens = 0 (an echo of the prompt, e.g. to score it): each target answers at once."""
        req = item.req
        made = []
        with self._lock:
            if req.done:
                return
            self.ledger.count(req, es.name, "prompt_tokens", len(ids))
            req.generated = True
            entry["cached_tokens"] = 0
            for g_i, gen in enumerate(targets):
                child = Item(GENERATED, {}, req, gen, item.branch + ((g_i,) if len(targets) > 1 else ()),
                             dict(item.turns), None, None, item.ids, entry, sampled=item.sampled | {gen},
                             split=item.split)
                child.data = self._generated(child, item.data, gen, "", "length", len(ids), 0, 0)
                req.items.add(child)
                made.append(child)
                self.flow.edge(es.segment.kv, gen, queue=False)
            req.items.discard(item)
        for child in made:
            self._task(self._leave_generate, child)

    def _generated(self, item: Item, request: dict, gen: str, text: str, reason, prompt_tokens: int,
                   completion_tokens: int, cached_tokens: int, counted: tuple | None = None) -> dict:
        """A Generated item's dict (what later stages and the answer see). `constrained`: whether
        `gen` held it to a format or a forced tool call from its first token, decided here, where
        the request it answers is known: after a join of a `returns = many` stage's elements the
        answer's `request` is the one that stage got, not the element's that set the format.
        `counted`: (constrained, thinks, reasoning tokens) worked out before (_format_and_thinking,
        outside the lock)."""
        constrained, thinking, thought = (counted if counted is not None
                                          else self._format_and_thinking(item, request, gen))
        data = {"id": item.req.id, "text": text, "finish_reason": reason,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "cached_tokens": cached_tokens},
                "generated_by": gen, "request": request, "constrained": constrained}
        if thought is not None:
            data["usage"]["reasoning_tokens"] = thought
        item.tool_read = read = self._read_tool_calls(gen, request, text, thinking)
        if read is not None and read.calls:     # the stages' own copy: the answer gives the calls as read
            data["tool_calls"] = [{**c, "function": dict(c["function"])} for c in read.calls]
        if item.logprobs is not None:
            data["logprobs"] = item.logprobs
        if request.get("return_token_ids"):
            data["token_ids"] = list(item.token_ids or ())
        if item.entry is not None and "prompt_token_ids" in item.entry:
            data["prompt_token_ids"] = item.entry["prompt_token_ids"]
            if "prompt_logprobs" in item.entry:
                data["prompt_logprobs"] = item.entry["prompt_logprobs"]
        return data

    def _format_and_thinking(self, item: Item, request: dict, gen: str) -> tuple[bool, bool, int | None]:
        """(whether `gen` held the answer to a format from its first token, whether the answer
        thinks (reasoning.stage_answer_thinks), how many of its tokens are its thinking under
        --reasoning-parser, None without one), for _generated. The count is
        taken where no lock is held: it reads the answer's tokens up to its first `</think>`
        (pipeline_dsl.reasoning's count_token_ids, each token's bytes looked up once per segment);
        0 for an answer that does not think (reasoning.stage_answer_thinks: a completions request, thinking
        turned off by the chat template, an answer held to a format from its first token)."""
        from pipeline_dsl.reasoning import count_token_ids, stage_answer_thinks

        constrained = self.constrained(gen, request)
        thinking = stage_answer_thinks(self, gen, request, constrained)
        if self.reasoning_parser is None:
            return constrained, thinking, None
        if not thinking:
            return constrained, False, 0
        bytes_of, end_id = self.seg_of_gen[gen].thinking_reader
        return constrained, True, count_token_ids(item.token_ids or (), bytes_of, end_id)

    def _read_tool_calls(self, gen: str, request: dict, text: str, thinking: bool = False):
        """The tool calls generate stage `gen`'s answer `text` holds (tools.ToolCallsRead), parsed
        as agp serve parses them for its answer (`tool_calls`: id, type, function name and JSON
        arguments), in the form its model writes them (tool_parser), where its request gave tools
        and a tool_choice other than none: what a python tool stage after the generate stage reads
        and runs, and what the answer gives (Choice.tool_read). `thinking` (reasoning.stage_answer_thinks): the
        answer starts in its thinking, so its calls are read from its content after `</think>`
        alone, as the client's answer reads them (pipeline_dsl.reasoning's split): a call written
        while thinking is reasoning text, run by no stage. None where the request gave no tools (or
        the answer, or its content, is empty)."""
        choice = request.get("tool_choice", "auto")
        if thinking:
            from pipeline_dsl.reasoning import split

            text = split(text, True)[1]
        if not text or not request.get("tools") or choice == "none":
            return None
        from pipeline_dsl.tools import read_tool_calls

        limit = None if request.get("parallel_tool_calls", True) else 1
        return read_tool_calls(text, limit, self.tool_parser(gen, choice))

    def _heard(self, item: Item, out, gen: str) -> None:
        """Tell the item's listener a delta of its streamed choice, the answer of generate stage
        `gen`, with its request's usage so far. A listener that fails on it hears nothing more of
        the request, so the request is aborted (its engine sequences freed, its python calls let
        go), not generated to its end unheard; its result is the answer_failed error."""
        with self._lock:
            usage = self.ledger.usage_so_far(item, out)
        if item.constrained is None or item.constrained[0] != gen:    # once per choice and stage, not a delta
            item.constrained = (gen, self.constrained(gen, item.data))
        if heard(item.req, item.index, out, usage, gen, item.constrained[1]):
            self.abort(item.req.key, "its answer could not be built (its listener failed on a delta)")

    def _heard_prompt(self, item: Item, logprobs: list) -> None:
        """A sequence's prompt logprobs, with its first output: kept for the answer, and a stream
        sends them before its tokens (once per request, whichever copy came first)."""
        entry = item.entry
        if entry is None or "prompt_logprobs" in entry:
            return
        entry["prompt_logprobs"] = logprobs
        tell_prompt(item.req, entry["prompt_token_ids"], logprobs)

    def _on_outputs(self, es, outputs) -> None:
        """An engine step's outputs (the executor's emit thread): deltas, then finished sequences."""
        now = self.clock()
        finished, unenforceable = [], []
        for out in outputs:
            item = self.ledger.item_of(out.request_id)
            if item is None or item.req.done:
                continue
            req = item.req
            if out.finished and out.finish_reason == "error":   # the grammar gave up mid-answer: no
                unenforceable.append((item, out))               # answer that parses, and no "error"
                continue                                        # finish reason (not OpenAI's)
            if getattr(out, "prompt_logprobs", None) is not None:
                self._heard_prompt(item, out.prompt_logprobs)
            if item.live is None and self.streams.chains.get(item.at):
                item.live = self._go_live(item)
            step_logprobs = getattr(out, "logprobs", None)
            if step_logprobs:
                if item.logprobs is None:
                    item.logprobs = []
                item.logprobs.extend(step_logprobs)
            want_ids = item.data.get("return_token_ids")
            if want_ids or self.reasoning_parser is not None:   # its thinking's tokens are counted at its end
                if item.token_ids is None:
                    item.token_ids = []
                item.token_ids.extend(out.new_token_ids)
            if item.live is not None:
                item.live.engine_output(out)           # the stream stages hand the client its text
            else:
                if out.new_token_ids:
                    self.ledger.first_token(req, now)
                # a token with no text yet (held back for a stop string, half a character) still
                # reaches a client that asked for the ids
                if item.index is not None and req.hears_deltas and (out.delta_text or out.finished or step_logprobs
                                                                    or (want_ids and out.new_token_ids)):
                    self._heard(item, out, item.at)
            if out.finished:
                finished.append((item, out))
        for item, out in unenforceable:            # the grammar, or a field (error_param) left no token
            why = (out.metrics or {}).get("error") or "the grammar refused a token"
            param = (out.metrics or {}).get("error_param")
            self._fail(item.req, PipelineError(why if param else f"the answer's constraint cannot be enforced: {why}",
                                               "invalid", item.at, param=param), item)
        if not finished:
            return
        # each answer's format and thinking tokens, worked out before the lock (a long answer's
        # count reads its tokens up to </think>, and every other request waits on the lock)
        counted = [None if item.req.done else self._format_and_thinking(item, item.data, item.at) for item, _ in finished]
        with self._lock:
            for (item, out), known in zip(finished, counted):
                req = item.req
                self.ledger.release(out.request_id)
                if req.done:
                    continue
                gen = item.at
                if item.submitted is not None:          # the sequence's life in the engine, on a lane
                    self.trace.add("requests", f"{gen}.generate", item.submitted, time.perf_counter(), -1,
                                   {"request": req.key, "id": str(req.id), "tokens": out.completion_tokens,
                                    "finish": out.finish_reason}, lane=True)
                self.ledger.finished_sequence(item, out, es.name)
                item.kind = GENERATED
                item.data = self._generated(item, item.data, gen, out.text, out.finish_reason, out.prompt_tokens,
                                            out.completion_tokens, out.cached_tokens, known)
                if getattr(out, "pooled", None) is not None:   # pooling = "mean": the prompt's mean hidden state
                    item.data["pooled"] = out.pooled
                if getattr(out, "stop_reason", None) is not None:   # the stop string or stop token id that ended it
                    item.data["stop_reason"] = out.stop_reason
        for item, out in finished:
            if not item.req.done:
                self._task(self._leave_generate, item)

    def _leave_generate(self, item: Item) -> None:
        try:
            nxt = self._send(item, item.at)
        except BaseException as e:                  # noqa: BLE001 - fails this request only
            self._fail_item(item, item.at, e)
            return
        self._go(nxt)

    def _on_seq_error(self, es, seq_id: str, exc: BaseException) -> None:
        item = self.ledger.item_of(seq_id)
        if item is not None:
            self._fail(item.req, PipelineError(str(exc), "invalid", item.at, getattr(exc, "code", None),
                                               getattr(exc, "param", None)), item)

    def _on_segment_failure(self, es, exc: BaseException) -> None:
        """A segment's loop died: fail everything, refuse what comes."""
        with self._lock:
            self.error = exc
            reqs = self.ledger.live()
        for req in reqs:
            self._fail(req, PipelineError(f"the engine of '{es.name}' failed: {type(exc).__name__}: {exc}",
                                          "unavailable"))

    def _callbacks(self, es):
        return (lambda outs: self._on_outputs(es, outs)), (lambda rid, exc: self._on_seq_error(es, rid, exc))

    def _admissions(self, es):
        """The callback that hears the sequences engine segment `es` took (its checks passed): their
        requests' listeners are told (tell_admitted), before any of their tokens. Only of a sequence
        whose tokens reach the client as its choice (an index: its generate stage streams straight
        to the respond stage): one taken by an earlier engine (a cascade's draft) may still be
        refused by the engine that answers, which a batch's stream must hear before its first chunk."""
        def admitted(seq_ids) -> None:
            items = (self.ledger.item_of(seq_id) for seq_id in seq_ids)
            answering = (item for item in items if item is not None and item.index is not None)
            for req in {id(item.req): item.req for item in answering}.values():   # n copies: once
                tell_admitted(req)
        return admitted


class _Tokens:
    """`token in tokens`: whether a tokenizer has that token (tool_parser_for's question), or with
    `special` whether it is one of its special tokens (keeps_markers')."""

    def __init__(self, tok, special: bool = False) -> None:
        self.to_id = getattr(tok, "token_to_id", None)
        self.ids = getattr(tok, "special_ids", frozenset()) if special else None

    def __contains__(self, token: str) -> bool:
        i = self.to_id(token) if self.to_id is not None else None
        return i is not None and (self.ids is None or i in self.ids)
