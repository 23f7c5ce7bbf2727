"""The engine: requests in, tokens and text out, one step at a time.

    engine = Engine(EngineConfig())
    engine.add_request("a", messages=[{"role": "user", "content": "Hi"}])
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.delta_text, end="")

A step has three phases that an executor may overlap: `schedule()` (host: which
sequences, which tokens), `execute(plan)` (compute: the model runner's forward over the
paged KV pool, then sampling) and `update(plan, tokens)` (host: detokenise, stop
checks, finish and free). `step()` runs them in order. When nothing runs and the batch
window is still open, `step()` returns [] at once; `next_deadline()` says when to call
again.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections import deque
from itertools import chain

import numpy as np
import torch

from pipeline_dsl.cliargs import env_switch

from .compute import on_compute
from .config import EngineConfig, RequestOutput, SamplingParams, percentile
from .cpus import available_cpus, cpus_text, default_threads
from .errors import ContextLengthError, InputError, KVPoolError, QueueFullError, limit_setting, past_prompt_limit
from .kv_cache import BlockManager, bytes_per_block, num_blocks_for_budget
from .batch import ItemsRunner, StepBatch
from .processors import Features
from .prompt_outputs import PromptOutputs, reduce_chunk, rows_wanted
from .quant import EMULATED_HALF_ROWS, HALF_TYPES
from .sampler import Detokenizer, Sampler, StopStrings, make_generator
from .scheduler import Scheduler, SchedulerOutput, Sequence
from .tokenizer import open_final_message

LATENCY_SAMPLES = 200_000  # most recent TTFT / per-token latencies kept for percentiles


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, runner=None, tokenizer=None,
                 clock=time.monotonic, models=None, step_timer=time.perf_counter):
        """Load the model named by `config` (or use an injected runner + tokenizer). `models`: a
        models.LoadedModels whose copy of the same weights this engine takes (loaded once for
        several engines); its own KV pool is allocated all the same. `step_timer`: what a CPU
        forward is timed with for the scheduler's time-sized rules (Scheduler.step_timer)."""
        self.config = config = config or EngineConfig()
        self.clock = clock
        # the forward's threads: the pipeline's, else torch's lowered to the CPUs a cgroup quota allows
        threads = int(config.threads) if config.threads else default_threads(torch.get_num_threads())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if runner is None:
            if resolve_device(config.device) == "cpu":   # its OpenMP pool on the thread that runs the forward
                runner, tokenizer, info = on_compute(load_runner, config, models)
            else:
                runner, tokenizer, info = load_runner(config, models)
        else:
            info = {}
        self.runner, self.tokenizer = runner, tokenizer
        # on CPU every forward and sampling runs on the compute thread (engine/compute.py)
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self._cpu = self.device.type == "cpu"
        self.threads = threads if self._cpu else None   # the CPU forward's (stats, the serve banner)
        self.cpus = available_cpus()                     # those this process may use
        # how libgomp's threads wait (read when torch loaded it; cpus.passive_waits may have chosen it)
        self.omp_wait = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() or "default"
        if self._cpu and threads > self.cpus:
            logging.getLogger("agp.engine").warning(
                "threads = %d is more than the %s this process may use (its affinity, its cgroup's "
                "CPU quota): the forward's threads will wait for each other; set threads = %d or fewer",
                threads, cpus_text(self.cpus), self.cpus)
        self.model_info = info
        # the model's recommended sampling defaults (generation_config.json, as vLLM reads it): what a
        # request and its generate stage leave unset takes them (flow/segment.py)
        self.generation_defaults = dict(info.get("generation_config") or {})
        self.vocab_size = int(getattr(runner, "vocab_size", 0) or info.get("vocab_size", 0))
        context = int(getattr(runner, "max_model_len", 0) or info.get("context_length", 0) or 2048)
        # a refusal names what set max_model_len (serve: --max-model-len or AGP_MAX_MODEL_LEN) and its value
        setting = limit_setting(config.max_model_len, config.max_model_len_by)
        if config.max_model_len is not None and config.max_model_len > context:
            raise InputError(f"{setting} is beyond the model's context of {context} tokens; "
                             f"set at most {context} or leave it out")
        # one sequence holds at most the whole KV pool: a context beyond it could never be served
        pool = int(runner.num_blocks) * int(runner.block_size)
        if config.max_model_len is not None and config.max_model_len > pool:
            raise InputError(f"{setting} does not fit the KV cache ({pool} tokens); "
                             f"raise the KV budget (kv_lookup's budget) or lower {config.max_model_len_by}")
        self.model_context = context
        self.max_model_len = min(int(config.max_model_len or context), pool)
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, config.prefix_reuse)
        self.scheduler = Scheduler(config, self.blocks, clock, max_len=self.max_model_len,
                                   step_timer=step_timer)
        self.sampler = Sampler(config.seed)
        if config.chat_template is not None:
            if tokenizer is None:
                raise InputError("chat_template: this engine has no tokenizer to render it")
            try:
                tokenizer.set_chat_template(config.chat_template)
            except ValueError as e:
                raise InputError(f"chat_template: {e}") from None
        # the runner's two phases (prepare: host arrays -> index tensors; run: the forward); a
        # runner that only has execute(items) is adapted once here
        self._phases = runner if callable(getattr(runner, "prepare", None)) else ItemsRunner(runner)
        # speculative decoding verifies drafts from every row's logits: a runner that returns them
        self.scheduler.verify = self.scheduler.verify and bool(getattr(self._phases, "returns_rows", False))
        self._step_rows: dict = {}            # _execute -> update: reduced prompt rows per item index
        self._forward_s: float | None = None  # forward -> sample_step: the step's forward seconds (CPU only)
        # the tokens that end an answer: the tokenizer's, or those its --generation-config folder lists
        self.eos_token_ids = frozenset(info["end_token_ids"] if "end_token_ids" in info
                                       else getattr(tokenizer, "eos_token_ids", ()) or ())
        # the tokenizer's own eos: an answer it ends has no stop_reason; the other end tokens (those
        # generation_config.json lists beside it) are vLLM's stop_token_ids, and name themselves
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.features = Features(self.vocab_size, self.eos_token_ids)   # penalties, bias, logprobs, grammars
        self.seqs: dict[str, Sequence] = {}
        self._counters = dict(requests_done=0, requests_aborted=0, prompt_tokens=0,
                              completion_tokens=0, cached_tokens=0, generated_tokens=0, steps=0, decode_steps=0,
                              decode_seqs=0, prefill_tokens=0, spec_drafts=0, spec_draft_tokens=0,
                              spec_accepted_tokens=0)
        self._ttft = deque(maxlen=LATENCY_SAMPLES)
        self._itl = deque(maxlen=LATENCY_SAMPLES)
        self._batch_hist: dict[int, int] = {}
        self._step_tokens: dict[int, int] = {}      # tokens through the model per step -> steps
        self._iteration_tokens: dict[int, int] = {}  # vLLM's tokens per step -> steps (vllm:iteration_tokens_total)
        self._busy_s = 0.0

    # ---- LoRA adapters (lora.py) --------------------------------------------------------
    def add_lora(self, adapter) -> None:
        """Serve a LoRA adapter (lora.read_adapter's) beside the base weights: a request whose
        SamplingParams.lora names it is answered with it. lora.LoraError where its matrices don't fit
        the model, or this engine's runner (an injected one) cannot apply adapters."""
        from .lora import LoraError

        add = getattr(self.runner, "add_lora", None)
        if add is None:
            raise LoraError(f"{adapter.path}: this engine's model runner cannot apply LoRA adapters")
        add(adapter)

    @property
    def loras(self) -> tuple[str, ...]:
        """The names of the LoRA adapters this engine serves."""
        return tuple(getattr(self.runner, "loras", None) or ())

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id, *, prompt=None, messages=None, prompt_token_ids=None,
                    params: SamplingParams | None = None, chat_template: bool = True,
                    add_special_tokens: bool = True, priority: int = 0) -> None:
        """Queue a request; raises InputError (never a hang) for input it cannot serve.

        `chat_template=False` sends messages as their contents joined by newlines;
        `add_special_tokens` lets the tokenizer add its BOS to a raw prompt (the encode stage's
        switches); `priority` (vLLM's): lower is admitted first when the engine schedules by
        priority (check_priority)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be SamplingParams, not {type(params).__name__}")
        params.check()
        if params.lora is not None and params.lora not in self.loras:
            raise InputError(f"no LoRA adapter named {params.lora!r} is loaded"
                             + (f" (these are: {', '.join(self.loras)})" if self.loras else ""), param="model")
        priority = self.check_priority(priority)      # 0.0 is 0
        request_id = str(request_id)
        if request_id in self.seqs:
            raise InputError(f"request id {request_id!r} is already in use")
        given = [n for n, v in (("prompt", prompt), ("messages", messages),
                                ("prompt_token_ids", prompt_token_ids)) if v is not None]
        if len(given) != 1:
            raise InputError("give exactly one of prompt, messages or prompt_token_ids"
                             + (f" (got {', '.join(given)})" if given else ""))
        ids = self.prompt_ids(prompt, messages, prompt_token_ids, chat_template, add_special_tokens)
        self.check_fits(len(ids), params.max_tokens)
        if self.vocab_size:
            for name, given in (("logit_bias", [t for t, _ in params.logit_bias]),
                                ("stop_token_ids", params.stop_token_ids),
                                ("allowed_token_ids", params.allowed_token_ids or ())):
                if given and max(given) >= self.vocab_size:
                    raise InputError(f"'{name}' holds token id {max(given)}, outside the vocabulary "
                                     f"(0..{self.vocab_size - 1})", param=name)
        if rows_wanted(params) and not getattr(self._phases, "returns_rows", False):
            raise InputError("this engine's model runner cannot return prompt logprobs or pooled states")
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the queue is full ({self.config.max_queue} waiting requests)")
        now = self.clock()
        seq = Sequence(request_id, ids, len(ids), params, now, priority)
        st = seq.state
        st.detok, st.stops = self._detokenizer(ids, params), StopStrings(params.stop)
        st.generator = make_generator(params.seed)
        st.bad_words = self.bad_words_ids(params.bad_words)
        if rows_wanted(params):
            seq.prompt_out = PromptOutputs(len(ids), params.prompt_logprobs, params.pooling)
        self.features.start(seq)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """ContextLengthError for a prompt of `prompt_tokens` tokens this engine can never run with
        `max_tokens` to generate: past the prompt limit (or the context), filling the context, or
        together past it. add_request's checks, and the flow runtime's for a request before it is
        queued (a full queue's 429 never hides them), in the same words."""
        if prompt_tokens > self.prompt_limit:
            raise ContextLengthError(f"prompt of {prompt_tokens} tokens {self._limit_words()}")
        total = prompt_tokens + max_tokens
        if max_tokens and prompt_tokens >= self.max_model_len:
            raise ContextLengthError(f"prompt of {prompt_tokens} tokens fills {self.context_words} and leaves no room "
                                     "to generate; shorten the prompt")
        if total > self.max_model_len:
            raise ContextLengthError(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} = {total} "
                                     f"exceeds {self.context_words}; "
                                     "shorten the prompt or lower max_tokens")

    def check_priority(self, priority) -> int:
        """The request's `priority` as an int (a whole float is that integer), or InputError for one
        this engine cannot honour: not a signed 64-bit integer, or non-zero while it schedules fcfs
        (as vLLM refuses it without priority scheduling: the value would silently change nothing)."""
        from stages.fields import ParamError, check_priority

        try:
            checked = check_priority(priority)
        except ParamError as e:
            raise InputError(str(e), param="priority") from None
        if priority and self.config.scheduling_policy != "priority":
            raise InputError(f"'priority' = {priority} needs priority scheduling, and this engine schedules "
                             f"{self.config.scheduling_policy} (set dynamic_batch's scheduling_policy = priority; "
                             "agp serve: --scheduling-policy priority); leave it out or give 0", param="priority")
        return checked

    def bad_words_ids(self, words) -> tuple[tuple[int, ...], ...]:
        """The token sequences `bad_words` bans, as vLLM makes them: each word (its leading spaces
        stripped) tokenised alone, then with one space before it, the latter kept only when it
        tokenises to as many tokens as the former and starts with another token (the word in the
        middle of a text). InputError (param bad_words) for a word that tokenises to nothing or
        to a token outside the vocabulary."""
        out: list[tuple[int, ...]] = []
        for word in words:
            plain = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            if not plain:
                raise InputError(f"'bad_words' holds {json.dumps(word)[:40]}, which tokenises to no token "
                                 "(give words of at least one character besides spaces)", param="bad_words")
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            out.append(plain)
            if len(spaced) == len(plain) and spaced[0] != plain[0]:
                out.append(spaced)
        if self.vocab_size and out and max(max(ids) for ids in out) >= self.vocab_size:
            raise InputError(f"'bad_words' tokenises to token id {max(max(ids) for ids in out)}, outside the "
                             f"model's vocabulary (0..{self.vocab_size - 1})", param="bad_words")
        return tuple(out)

    def prompt_ids(self, prompt=None, messages=None, prompt_token_ids=None, chat_template=True,
                   add_special_tokens=True, tools=None, tool_choice="auto", template_kwargs=None,
                   add_generation_prompt=True, continue_final_message=False, keep_last=None,
                   allow_empty=False) -> list[int]:
        """A request's prompt as token ids (chat template applied to messages, with
        `template_kwargs` as extra template variables; the assistant's turn opened after them, or
        with `continue_final_message` the last message left open for the answer to go on): the
        encode stage's work. Thread-safe (reads only the tokenizer), so it may run off the engine's
        loop. A text too long to fit the prompt limit whatever its tokens is refused before it is
        tokenised, unless `keep_last` asks for the prompt's last tokens alone (vLLM's
        truncate_prompt_tokens; -1: the context). `allow_empty`: an empty prompt is its ids (none,
        or the start token), as /tokenize counts it, not an error as a prompt to answer is."""
        if keep_last == -1:
            keep_last = self.max_model_len
        elif keep_last and keep_last > self.max_model_len:
            raise ContextLengthError(f"'truncate_prompt_tokens' = {keep_last} is beyond {self.context_words}",
                                     param="truncate_prompt_tokens")
        if not keep_last:
            self.check_prompt_length(prompt, messages, prompt_token_ids)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, not {type(prompt).__name__}")
            if not prompt and not allow_empty:
                raise InputError("the prompt is empty")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        elif messages is not None:
            ids = self._render_chat(messages, chat_template, add_special_tokens, tools, tool_choice, template_kwargs,
                                    add_generation_prompt, continue_final_message, check_length=not keep_last)
        else:
            if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt_token_ids):
                raise InputError("prompt_token_ids must be a list of integers")
            ids = list(prompt_token_ids)
            bad = [t for t in ids if t < 0 or (self.vocab_size and t >= self.vocab_size)]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if not ids and not allow_empty:
            raise InputError("the prompt is empty (no tokens)")
        return ids[-keep_last:] if keep_last else ids

    @property
    def prompt_limit(self) -> int:
        """The most prompt tokens a request may have (max_prompt_tokens, else the context)."""
        return int(self.config.max_prompt_tokens or self.max_model_len)

    def _limit_words(self) -> str:
        if self.config.max_prompt_tokens:
            return past_prompt_limit(self.prompt_limit, self.config.prompt_limit_by)
        return f"exceeds {self.context_words}"

    @property
    def pool_bound(self) -> bool:
        """The KV pool, holding fewer tokens than the model's context, is the context."""
        return self.max_model_len < self.model_context and not self.config.max_model_len

    @property
    def context_words(self) -> str:
        """The context as an error names it: the model's, or the KV cache's when that holds less."""
        if self.pool_bound:
            return (f"the context of {self.max_model_len} tokens, all the KV cache holds (raise the KV budget "
                    f"for more of the model's {self.model_context})")
        return f"the model's context of {self.max_model_len} tokens"

    @property
    def max_prompt_chars(self) -> int | None:
        """More characters than this cannot fit the prompt limit, whatever their tokens."""
        per_token = getattr(self.tokenizer, "max_token_chars", None)
        return self.prompt_limit * per_token if per_token else None

    def check_prompt_length(self, prompt=None, messages=None, prompt_token_ids=None, rendered=False) -> None:
        """InputError for a prompt that cannot fit the limit, decided without tokenising it
        (`rendered`: the prompt is a conversation as the chat template wrote it)."""
        limit = self.prompt_limit
        per_token = getattr(self.tokenizer, "max_token_chars", None)
        if isinstance(prompt_token_ids, (list, tuple)) and len(prompt_token_ids) > limit:
            raise ContextLengthError(f"prompt of {len(prompt_token_ids)} tokens {self._limit_words()}")
        if not per_token:
            return
        if isinstance(prompt, str):
            chars = len(prompt)
        elif isinstance(messages, (list, tuple)):
            chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
        else:
            return
        if chars > limit * per_token:
            what = "conversation rendered by the chat template" if rendered else "prompt"
            raise ContextLengthError(f"{what} of {chars} characters {self._limit_words()}; a token stands for at most "
                                     f"{per_token} characters")

    def _render_chat(self, messages, chat_template=True, add_special_tokens=True, tools=None,
                     tool_choice="auto", template_kwargs=None, add_generation_prompt=True,
                     continue_final_message=False, check_length=True) -> list[int]:
        rendered, special = self._chat_text(messages, chat_template, add_special_tokens, tools, tool_choice,
                                            template_kwargs, add_generation_prompt, continue_final_message)
        if not isinstance(rendered, str):
            return list(rendered)
        if special is None and rendered and check_length:
            # what the template wrote around the messages (their turns' markers, the tools) counts
            # too: a conversation of many short messages, or of tools, refused before tokenising
            self.check_prompt_length(prompt=rendered, rendered=True)
        if not rendered and special is not None:
            return []
        return list(self.tokenizer.encode(rendered, add_special_tokens=bool(special)))

    def _chat_text(self, messages, chat_template=True, add_special_tokens=True, tools=None,
                   tool_choice="auto", template_kwargs=None, add_generation_prompt=True,
                   continue_final_message=False) -> tuple:
        """(a conversation as its chat template renders it: text, or ids where the template gives
        ids; how that text is encoded: None as a rendering, whose template wrote the special
        tokens, else add_special_tokens, for the messages' contents joined without a template).
        InputError for messages the template cannot render."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("messages must be a non-empty list of {role, content} objects")
        if continue_final_message and add_generation_prompt:
            raise InputError("continue_final_message and add_generation_prompt cannot both be true: the answer "
                             "either goes on with the last message or starts a new turn")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InputError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not chat_template:
            return "\n".join(m["content"] for m in messages), add_special_tokens
        extra = dict(template_kwargs or {})       # the request's own variables (enable_thinking, ...)
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            from pipeline_dsl.tools import prepare_messages, template_takes_tools

            pick = getattr(self.tokenizer, "chat_template_for", None)    # a model's tool_use template
            template = pick(tools or None) if pick else getattr(self.tokenizer, "chat_template", None)
            native = template_takes_tools(template)
            messages = prepare_messages(list(messages), tools, template_takes_tools=native, choice=tool_choice)
            if native and tools:        # tool_choice "none" too, as vLLM renders them
                extra["tools"] = tools
        try:
            rendered = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                          **extra)
        except InputError:
            raise
        except Exception as e:  # a template that refuses the conversation (roles out of order, …)
            raise InputError(f"the chat template cannot render these messages: {e}") from None
        if continue_final_message:
            rendered = open_final_message(rendered, messages[-1]["content"])
        return rendered, None

    def prompt_tokens_at_most(self, prompt=None, messages=None, chat_template=True, add_special_tokens=True,
                              tools=None, tool_choice="auto", template_kwargs=None, add_generation_prompt=True,
                              continue_final_message=False) -> int | None:
        """At most how many ids prompt_ids() gives for a text prompt or a conversation, counted
        without tokenising it: its text's UTF-8 bytes (Tokenizer.max_tokens: a token stands for one
        byte at least) and the special tokens the engine adds; a conversation's as its chat
        template renders it, every marker and tool the template writes counted (rendering is cheap
        beside tokenising). None where it cannot tell: a tokenizer without the bound (its
        normalizer may lengthen text), or messages the template refuses (prompt_ids says why)."""
        bound = getattr(self.tokenizer, "max_tokens", None)
        if bound is None:
            return None
        if prompt is not None:
            return bound(prompt, add_special_tokens) if isinstance(prompt, str) else None
        try:
            rendered, special = self._chat_text(messages, chat_template, add_special_tokens, tools, tool_choice,
                                                template_kwargs, add_generation_prompt, continue_final_message)
        except InputError:
            return None
        if not isinstance(rendered, str):
            return len(rendered)
        return bound(rendered, bool(special))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _detokenizer(self, prompt_ids, params: SamplingParams):
        helper = getattr(self.tokenizer, "incremental_decoder", None)
        if helper is not None:
            return _HelperDetokenizer(helper(skip_special_tokens=params.skip_special_tokens,
                                             spaces_between_special_tokens=params.spaces_between_special_tokens))
        return Detokenizer(self._decode, prompt_ids)

    def abort(self, request_id) -> None:
        """Stop a request and free its KV blocks (unknown or finished ids are ignored)."""
        seq = self.seqs.pop(str(request_id), None)
        if seq is not None:
            self.scheduler.remove(seq, "abort")
            self.features.release(seq)
            self._counters["requests_aborted"] += 1

    def park(self, request_id, parked: bool = True) -> None:
        """Pause a request (parked: out of the batch, its KV blocks freed) or let it go on (it
        waits for a slot again, and recomputes what it had); unknown or finished ids are ignored.
        A parked request counts as neither running nor waiting."""
        seq = self.seqs.get(str(request_id))
        if seq is not None:
            (self.scheduler.park if parked else self.scheduler.unpark)(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        """Sequences being prefilled or decoded now."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting to be scheduled."""
        return len(self.scheduler.waiting)

    def next_deadline(self) -> float | None:
        """Clock time when waiting requests will be admitted; None: step now (or idle)."""
        return self.scheduler.next_deadline()

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.schedule()
        if plan.empty:
            return []
        return self.update(plan, self.execute(plan))

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def execute(self, plan: SchedulerOutput) -> list[int]:
        """Run the model over the plan and sample; returns one token per sampling item (on CPU:
        on the compute thread, whichever thread calls)."""
        if self._cpu:
            return on_compute(self._execute, plan)
        return self._execute(plan)

    def _execute(self, plan: SchedulerOutput) -> list:
        t0 = time.perf_counter()
        with torch.inference_mode():
            step = self.prepare(self.step_batch(plan))
            logits = self.forward(step, plan=plan)                          # [n_sample, V] or None
            sampled, verified = self.sample_step(plan, logits, step.rows)
        tokens = sampled.tolist()
        for j, got in verified.items():           # a verifying item samples its accepted tokens
            tokens[j] = got
        self._step_rows = self.reduce_rows(plan, step.rows or {})
        if not self._cpu:                   # on CPU forward() counted the model's time
            self._busy_s += time.perf_counter() - t0
        return tokens

    # ---- the model runner's two phases (an executor overlaps them with other work) ------
    def step_batch(self, plan: SchedulerOutput) -> StepBatch:
        """The step's inputs as arrays: tokens (PLACEHOLDER where a token is still in flight),
        starts, counts, sample flags, and the block tables as rows of the block manager's array."""
        items = plan.items
        decodes = not plan.num_prefill_tokens and not plan.num_draft_tokens  # decodes: one token each
        # one pass over the items, its columns split by zip (per item no call: a step of 32
        # sequences took ~230 Python calls here as generator expressions)
        cols = [(it.start, it.num_tokens, it.sample, it.seq.request_id,
                 it.seq.token_ids[it.start] if decodes else 0, it.seq.prompt_out is not None)
                for it in items]
        starts, counts, sample, ids, first, outs = zip(*cols) if cols else ((),) * 6
        starts, counts = np.array(starts, np.int64), np.array(counts, np.int64)
        rows = np.array(self.blocks.rows(ids), np.int64)
        tables, lens = self.blocks.tables.rows(rows)                        # [n, W], [n]
        if decodes:
            tokens = np.array(first, np.int64)
        else:       # a verifying item: its last token, then its drafts (speculate.py)
            toks = chain.from_iterable(it.seq.token_ids[it.start:it.start + it.num_tokens] if not it.draft
                                       else (it.seq.token_ids[it.start], *it.draft) for it in items)
            tokens = np.fromiter(toks, np.int64, int(counts.sum()))
        wanted = ([self.rows_of(it) for it in items]                         # prompt outputs, drafts' rows
                  if any(outs) or plan.num_draft_tokens else ())
        lora = [it.seq.params.lora for it in items] if getattr(self.runner, "loras", None) else ()
        return StepBatch(tokens, starts, counts, np.array(sample, bool), tables, lens, plan.pad_to,
                         rows=wanted if any(wanted) else None, lora=lora if any(lora) else None)

    def prepare(self, batch: StepBatch):
        """The runner's index tensors of a step (host work; on CUDA one non-blocking upload)."""
        return self._phases.prepare(batch)

    @staticmethod
    def fill(step, sources: list[torch.Tensor]) -> None:
        """Put the tokens sampled by earlier steps into a prepared step's in-flight rows, on the
        device (no round trip): `sources` are those steps' sampled tensors, in the order that
        StepBatch.fill_from indexes their concatenation."""
        if step.fills is None:
            return
        src = sources[0] if len(sources) == 1 else torch.cat(sources)              # [sum n_sample]
        step.tokens.index_copy_(0, step.fills, src.index_select(0, step.fill_from))  # [F] rows

    def forward(self, step, want_logits: bool = True, graphs: bool = True,
                plan: SchedulerOutput | None = None) -> torch.Tensor | None:
        """The model over a prepared step: logits [n_sample, V] (None when no row is sampled or
        want_logits is False). `graphs`: replay a captured CUDA graph where one fits. The rows of
        tokens still in flight (step.fills) must have been filled on the device first. With the
        step's `plan`, on CPU, its time goes to the scheduler, which sizes prefill by it
        (itl_target_s; on CUDA the call returns before the device has computed)."""
        self._forward_s = None
        if plan is None or not self._cpu:
            return self._phases.run(step, want_logits, graphs)
        timer = self.scheduler.step_timer
        t0 = timer()
        out = self._phases.run(step, want_logits, graphs)
        dt = self._forward_s = timer() - t0
        self.scheduler.observe(plan.num_prefill_tokens + plan.num_draft_tokens, dt)   # drafts: rows as a prompt's
        self._busy_s += dt                  # stepped here or by an executor: the model's time
        return out

    # ---- prompt outputs (prompt_outputs.py): every row of a prompt's chunks ---------------
    @staticmethod
    def rows_of(item) -> tuple[str, ...]:
        """What the runner returns for every row of a scheduled item: () unless it is a prompt
        chunk of a sequence that wants its prompt's logprobs or pooled hidden states, or a decode
        that verifies drafts."""
        if item.draft:                    # speculative decoding: every row's logits, to verify the drafts
            return ("logits",)
        seq = item.seq
        if seq.prompt_out is None or item.start >= seq.num_prompt:
            return ()
        return rows_wanted(seq.params)

    def reduce_rows(self, plan: SchedulerOutput, rows: dict) -> dict:
        """The runner's rows of a step (item index -> {"logits", "hidden"}) reduced per chunk:
        item index -> ChunkRows (the compute thread; small tensors, still on the device)."""
        out = {}
        with torch.inference_mode():
            for index, got in rows.items():
                it = plan.items[index]
                if it.draft:                      # a verifying decode's rows: sample_step's
                    continue
                seq = it.seq
                end = min(it.start + it.num_tokens + 1, seq.num_prompt)
                targets = seq.token_ids[it.start + 1:end]         # the prompt token after each row
                out[index] = reduce_chunk(it.start, got, targets, seq.params.prompt_logprobs)
        return out

    def accept_rows(self, seq: Sequence, chunk) -> None:
        """A chunk's reduced rows onto its sequence (host, in step order)."""
        if seq.prompt_out is not None:
            seq.prompt_out.add(chunk, seq.token_ids)

    def finish_prefilled(self, seq: Sequence, computed: int, now: float) -> RequestOutput | None:
        """A max_tokens = 0 sequence whose prompt a step just computed to its end (`computed`: the
        end of that step's chunk): finished ("length") with its prompt outputs and no token; None
        for any other sequence or chunk."""
        if seq.params.max_tokens != 0 or computed < seq.num_prompt or not self.is_live(seq):
            return None
        st = seq.state
        st.first = st.last = now
        self._finish(seq, "length")
        scheduled = seq.scheduled if seq.scheduled is not None else seq.arrival
        metrics = {"ttft_s": now - seq.arrival, "latency_s": now - seq.arrival, "queue_s": scheduled - seq.arrival,
                   "prefill_s": now - scheduled, "decode_s": 0.0, "preemptions": seq.num_preemptions,
                   "pauses": seq.num_pauses}
        prompt_lp, pooled = seq.prompt_out.take() if seq.prompt_out is not None else (None, None)
        return RequestOutput(seq.request_id, [], "", "", True, "length", seq.num_prompt, 0, seq.cached_tokens,
                             metrics, None, prompt_lp, pooled)

    def sample(self, logits: torch.Tensor | None, seqs: list[Sequence]) -> torch.Tensor:
        """One step's tokens for `seqs` (one row of `logits` [n, V] each, changed in place) ->
        [n] long on the logits' device. Rows that use no sampling feature cost what they always
        did (all greedy: an argmax without a host sync); the others get logit_bias, penalties,
        min_tokens and their grammar's mask, and have their state advanced (processors.py).
        Called once per step, in step order, from one thread (the executor's compute thread)."""
        if torch.is_inference_mode_enabled():          # the executor's forward is already in it
            return self.features.sample(logits, seqs, self.sampler, self.is_live)
        with torch.inference_mode():
            return self.features.sample(logits, seqs, self.sampler, self.is_live)

    # ---- speculative decoding (speculate.py) ----------------------------------------------
    def sample_step(self, plan: SchedulerOutput, logits: torch.Tensor | None, rows: dict | None):
        """A step's sampling: ([n_sample] long tokens on the logits' device, {sample index: accepted
        tokens} of the items that verify drafts). Without drafts, sample() over the step's rows.
        An item with drafts is verified from every row's logits (`rows`, the runner's); its
        entry in the tensor is its last token."""
        items = [it for it in plan.items if it.sample]
        if not items:
            return torch.empty(0, dtype=torch.long), {}
        seqs = [it.seq for it in items]
        if not plan.num_draft_tokens:
            return self.sample(logits, seqs), {}
        index = {id(it): i for i, it in enumerate(plan.items)}
        plain = [j for j, it in enumerate(items) if not it.draft]
        out = torch.zeros(len(items), dtype=torch.long, device=logits.device)
        if plain:
            at = torch.tensor(plain, dtype=torch.long).to(logits.device)
            out.index_copy_(0, at, self.sample(logits.index_select(0, at), [seqs[j] for j in plain]))
        verified = {}
        for j, it in enumerate(items):
            if it.draft:
                got = verified[j] = self.verify(it.seq, rows[index[id(it)]]["logits"], it.draft)
                out[j] = got[-1]
        decodes = sum(1 for it in items if it.draft or it.num_tokens == 1)
        # the step's forward time (forward()'s, on CPU) where it verified and prefilled nothing
        seconds = self._forward_s if not plan.num_prefill_tokens else None
        self.scheduler.verified(decodes, sum(len(v) for v in verified.values()) + decodes - len(verified), seconds)
        return out, verified

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: tuple[int, ...]) -> list[int]:
        """The tokens a verifying step gives `seq`: logits [1 + k, V] of its last token's row and
        its k drafts' rows. Each row in turn is sampled exactly as a plain decode step would sample
        that position (sample(): the features' state advanced by each token taken, a sampled row
        drawing its request's next uniform number), and its draft is accepted when the token drawn
        is the draft; the first token that is not its row's draft is the last. The token at each
        position is thus the one decoding without drafts would give (a seeded request's text does
        not depend on whether, or how much, it drafted), and a draft t is accepted with
        probability p(t), a rejected row's token drawn from p without t. A plain greedy sequence:
        the argmax of every row at once, the drafts accepted while they equal it."""
        if seq.params.greedy and seq.state.plain:
            best = logits.argmax(dim=-1).tolist()                               # [1 + k]
            n = 0
            while n < len(draft) and best[n] == draft[n]:
                n += 1
            return best[:n + 1]
        got = []
        for i in range(len(draft) + 1):
            token = int(self.sample(logits[i:i + 1], [seq])[0])
            got.append(token)
            if i == len(draft) or token != draft[i]:
                break
        return got

    def accept_tokens(self, seq: Sequence, item, tokens: list[int], now: float) -> RequestOutput:
        """A verifying step's tokens (their K/V kept by scheduler.accept_drafts, or recomputed after
        a preemption) appended to the sequence's ids and accepted one by one as decoded tokens are
        (stops, max_tokens, logprobs), up to the first that finishes it: one output for them all."""
        c = self._counters
        c["spec_drafts"] += 1
        c["spec_draft_tokens"] += len(item.draft)
        c["spec_accepted_tokens"] += len(tokens) - 1
        ids = seq.token_ids
        outs = []
        for token in tokens:
            ids.append(token)
            outs.append(self.accept_token(seq, token, now))
            if outs[-1].finished:
                break
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        logprobs = None if last.logprobs is None else [e for o in outs for e in (o.logprobs or ())]
        return RequestOutput(last.request_id, [t for o in outs for t in o.new_token_ids],
                             "".join(o.delta_text for o in outs), last.text, last.finished, last.finish_reason,
                             last.prompt_tokens, last.completion_tokens, last.cached_tokens, last.metrics,
                             logprobs, outs[0].prompt_logprobs, outs[0].pooled, last.stop_reason)

    def update(self, plan: SchedulerOutput, tokens: list) -> list[RequestOutput]:
        self.record_step(plan, [t for t in tokens if isinstance(t, list)] if plan.num_draft_tokens else ())
        now = self.clock()
        outputs = []
        chunks, self._step_rows = self._step_rows, {}
        chunk_of = {plan.items[i].seq: c for i, c in chunks.items()}
        draft_of = {it.seq: it for it in plan.items if it.draft} if plan.num_draft_tokens else {}
        for seq, token in self.scheduler.update(plan, tokens):
            if seq in chunk_of:
                self.accept_rows(seq, chunk_of[seq])
            if seq in draft_of:
                outputs.append(self.accept_tokens(seq, draft_of[seq], token, now))
            elif token is not None:
                outputs.append(self.accept_token(seq, token, now))
            else:
                done = self.finish_prefilled(seq, seq.num_computed, now)
                if done is not None:
                    outputs.append(done)
        return outputs

    # ---- the contract of an executor that runs the phases itself (pipeline_dsl.engine.executor)
    def record_step(self, plan: SchedulerOutput, verified=()) -> None:
        """Count one executed step (steps, prefill tokens, batch sizes). `verified`: the tokens
        each item that verified drafts gave (sample_step's), its accepted drafts and its own."""
        c = self._counters
        c["steps"] += 1
        c["prefill_tokens"] += plan.num_prefill_tokens
        if plan.num_decodes:
            c["decode_steps"] += 1
            c["decode_seqs"] += len(plan.items)
        self._batch_hist[len(plan.items)] = self._batch_hist.get(len(plan.items), 0) + 1
        tokens = plan.num_prefill_tokens + plan.num_decodes + plan.num_draft_tokens   # through the model
        self._step_tokens[tokens] = self._step_tokens.get(tokens, 0) + 1
        # vLLM v1's count of a step's tokens: those generated (a verifying item's accepted drafts
        # too), plus the whole prompt of each sequence whose prompt's prefill ends in it (a chunk
        # before that counts none; a recompute after a preemption, which ends past the prompt,
        # counts only its token)
        counted = sum(it.sample + (it.seq.num_prompt if it.start + it.num_tokens == it.seq.num_prompt else 0)
                      for it in plan.items) + sum(len(got) - 1 for got in verified)
        self._iteration_tokens[counted] = self._iteration_tokens.get(counted, 0) + 1

    def block_table(self, seq: Sequence) -> list[int]:
        """The physical KV blocks of a running sequence, in position order."""
        return self.blocks.table(seq.request_id)

    def is_live(self, seq: Sequence) -> bool:
        """Whether `seq` is still this engine's (not finished, aborted or replaced)."""
        return self.seqs.get(seq.request_id) is seq

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Publish the sequence's full blocks among its first `num_computed` tokens for prefix reuse."""
        if seq.request_id in self.blocks.seqs:
            self.blocks.commit(seq.request_id, seq.token_ids, num_computed)

    def accept_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        """A token sampled for `seq` (already appended to its ids): detokenise, check stops,
        finish it when done, and say what changed."""
        st, p = seq.state, seq.params
        self._counters["generated_tokens"] += 1
        if st.first is None:
            st.first = now
            self._ttft.append(now - seq.arrival)
        else:
            self._itl.append(now - st.last)
        st.last = now
        text_from = len(st.text)
        reason = stop_reason = None
        num_output = seq.num_output            # the token is in seq.token_ids: fixed from here on
        logprobs = self.features.logprobs_of(seq, token) if p.logprobs is not None else None
        # at the end, the bytes no later token made a character of are left out (flushing would
        # show them as U+FFFD), however it ended, as vLLM's detokeniser never writes them; a stray
        # byte before other text is U+FFFD, as the tokenizer decodes it
        if st.error_at is not None and num_output > st.error_at:
            reason = "error"                   # the grammar refused a token: see metrics["error"]
            st.text += st.detok.flush().rstrip("\ufffd")
        elif token in p.stop_token_ids or (token in self.eos_token_ids and (
                not p.ignore_eos or p.constraint is not None)):   # a grammar's EOS always ends it
            reason = "stop"           # the stop token's own text only when asked (skip_special_tokens drops a special one)
            if p.ignore_eos or token != self.eos_token_id:
                # vLLM's stop_reason: the listed id, or an end token other than the tokenizer's eos
                # (vLLM adds generation_config.json's to the stop_token_ids); the tokenizer's eos: None
                stop_reason = token if token in p.stop_token_ids or (
                    not p.ignore_eos and token in self.eos_token_ids) else None
            rest = st.detok.add(token, final=True) if p.include_stop_str_in_output else st.detok.flush()
            st.text += rest.rstrip("\ufffd")
        else:
            last = num_output >= p.max_tokens or num_output + seq.num_prompt >= self.max_model_len
            piece = st.detok.add(token, final=last)
            st.text += piece.rstrip("\ufffd") if last else piece
            # no stop string ends the answer before min_tokens tokens (vLLM: those completing in
            # the text of token min_tokens + 1 or later, however early they begin)
            cut = st.stops.find(st.text, text_from, report=num_output > p.min_tokens) if st.stops.stops else -1
            if cut >= 0:
                end = cut + st.stops.matched if p.include_stop_str_in_output else cut
                stop_reason = st.text[cut:cut + st.stops.matched]        # which stop string (vLLM's stop_reason)
                st.text, reason = st.text[:end], "stop"
            elif last:
                reason = "length"
        text = st.text
        # nothing is held back when the stop string is shown anyway (vLLM does the same)
        held = 0 if p.include_stop_str_in_output or not st.stops.stops else st.stops.hold_back()
        visible = len(text) if reason else len(text) - held
        visible = max(visible, st.emitted)
        delta, st.emitted = text[st.emitted:visible], visible
        metrics = {}
        if reason:
            self._finish(seq, reason)
            scheduled = seq.scheduled if seq.scheduled is not None else seq.arrival
            metrics = {"ttft_s": st.first - seq.arrival, "latency_s": now - seq.arrival,
                       "queue_s": scheduled - seq.arrival, "prefill_s": st.first - scheduled,
                       "decode_s": now - st.first, "preemptions": seq.num_preemptions,
                       "pauses": seq.num_pauses}
            if reason == "error":
                metrics["error"] = st.error
                if st.error_param:
                    metrics["error_param"] = st.error_param
        prompt_lp, pooled = seq.prompt_out.take() if seq.prompt_out is not None else (None, None)
        return RequestOutput(seq.request_id, [token], delta, text, reason is not None, reason,
                             seq.num_prompt, num_output, seq.cached_tokens, metrics, logprobs,
                             prompt_lp, pooled, stop_reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq, reason)
        self.seqs.pop(seq.request_id, None)
        self.features.release(seq)
        c = self._counters
        c["requests_done"] += 1
        c["prompt_tokens"] += seq.num_prompt
        c["completion_tokens"] += seq.num_output
        c["cached_tokens"] += seq.cached_tokens

    # ---- measuring ---------------------------------------------------------------------
    def stats(self, latencies: bool = True) -> dict:
        """Counters for summaries and /metrics; `latencies=False` skips the per-token samples
        (cheap enough to call on every scrape)."""
        c = dict(self._counters)
        decode_seqs = c.pop("decode_seqs")
        c["mean_batch_size"] = decode_seqs / c["decode_steps"] if c["decode_steps"] else 0.0
        c["hit_rate"] = self.blocks.hit_rate
        c["running"] = len(self.scheduler.running)
        c["waiting"] = len(self.scheduler.waiting)
        if self.loras:                      # LoRA adapters: those loaded, and those of running and waiting requests
            c["lora_adapters"] = list(self.loras)
            for key, seqs in (("lora_running", list(self.scheduler.running)),
                              ("lora_waiting", list(self.scheduler.waiting))):   # copies: taken under the GIL
                c[key] = sorted({s.params.lora for s in seqs if s.params.lora is not None})
        c["preemptions"] = self.scheduler.num_preemptions
        c["busy_s"] = self._busy_s
        c["batch_size_hist"] = dict(sorted(self._batch_hist.items()))
        c["step_tokens_hist"] = dict(sorted(self._step_tokens.items()))
        c["iteration_tokens_hist"] = dict(sorted(self._iteration_tokens.items()))
        c.update(self.blocks.stats())
        if latencies:
            c["ttft_s"] = list(self._ttft)
            c["itl_s"] = list(self._itl)
            for name, xs in (("ttft", self._ttft), ("itl", self._itl)):
                c[f"{name}_p50_s"] = percentile(xs, 50)
                c[f"{name}_p99_s"] = percentile(xs, 99)
        c["peak_memory_bytes"] = peak_memory_bytes(self.config.device)
        if self.threads is not None:
            c["threads"], c["cpus"], c["omp_wait_policy"] = self.threads, self.cpus, self.omp_wait
            guard = getattr(self.runner, "guard", None)    # steps sent to one thread while contended
            c["one_thread_steps"] = guard.solo_steps if guard is not None else 0
        c.update({k: v for k, v in self.model_info.items() if isinstance(v, (int, float, str))})
        fallbacks = getattr(getattr(self.runner, "model", None), "compile_fallbacks", None)
        failed = fallbacks() if callable(fallbacks) else []
        c["compile_fallbacks"] = len(failed)        # torch.compile pieces running eagerly
        if failed:
            c["compile_fallback"] = "; ".join(failed)
        return c


class _HelperDetokenizer:
    """The tokenizer's own IncrementalDecoder behind the Detokenizer interface."""

    def __init__(self, decoder):
        self.decoder = decoder

    def add(self, token_id: int, final: bool = False) -> str:
        text = self.decoder.add([token_id])
        return text + self.decoder.flush() if final else text

    def flush(self) -> str:
        return self.decoder.flush()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but no CUDA device is available; use device = cpu")
    return device


def load_runner(config: EngineConfig, models=None):
    """(ModelRunner, Tokenizer, info dict) for config.model, its KV pool sized to the budget
    (info's `end_token_ids`: the end tokens a --generation-config folder gives, where one does).
    `models` (models.LoadedModels): the weights come from it, read from the file only by the first
    engine that asks for them (info's `weights_shared` says whether this one took them loaded)."""
    from . import native
    from .model import ModelRunner
    from .models import generation_defaults, load_model, read_generation_config, resolve_model

    t0 = time.perf_counter()
    try:                                # the engine's switches, before anything loads (docs/gpu.md)
        invariant = env_switch("AGP_BATCH_INVARIANT", False)          # invariant.py
        graphs = env_switch("AGP_CUDA_GRAPHS", True)
        env_switch("AGP_NATIVE", True)                                # read by native.load()
        native.activation_choice()                                    # AGP_NATIVE_ACT, read as layers are built
    except ValueError as e:
        raise InputError(str(e)) from None
    device = resolve_device(config.device)
    source = resolve_model(config.model)
    # an HF folder's generation_config.json, read once: the sampling defaults and the tokenizer's eos ids;
    # --generation-config FOLDER's, read once: the sampling defaults and the engine's end tokens
    own = read_generation_config(source.path) if source.kind == "hf" else None
    given = (read_generation_config(config.generation_config)
             if config.generation_config not in ("auto", "vllm") else None)
    sampling = generation_defaults(source, config.generation_config,             # before the weights: a bad
                                   own if given is None else given,              # file stops it
                                   config.override_generation_config)
    if models is not None:
        model, tokenizer, shared = models.load(source, dtype=config.dtype, device=device, compile=config.compile,
                                               generation_config=own)
    else:
        model, tokenizer = load_model(source, dtype=config.dtype, device=device, generation_config=own)
        shared = False
    end_tokens = None
    if given is not None:
        # --generation-config FOLDER: its end tokens, not the model's own file's (vLLM reads both the
        # sampling defaults and the eos_token_id list from that folder); a GGUF's own end tokens stay.
        # The engine's own: the tokenizer stays as loaded (LoadedModels shares its model between engines)
        from .errors import ModelFileError
        from .tokenizer import TokenizerError, listed_end_tokens

        base = {tokenizer.eos_token_id} if source.kind == "hf" else set(tokenizer.eos_token_ids)
        try:
            listed = listed_end_tokens(config.generation_config, given)
        except TokenizerError as e:     # that folder's file at fault, as the model's own would be
            raise ModelFileError(str(e)) from None
        end_tokens = frozenset(i for i in base | set(listed) if i is not None)
    c = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    per_block = bytes_per_block(c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, elem)
    num_blocks = num_blocks_for_budget(config.kv_budget_bytes, per_block)
    if num_blocks < 1:
        raise InputError(f"KV budget of {config.kv_budget_bytes} bytes is less than one block "
                         f"({per_block} bytes); raise the budget")
    # attention: "auto" reads the pool in place with FlexAttention on CUDA (flex.py), gathers on CPU
    attention = os.environ.get("AGP_ATTENTION", "") or "auto"
    try:
        runner = ModelRunner(model, num_blocks, config.block_size, None, device, pad_decode=config.padding,
                             compile=config.compile, batch_invariant=invariant, attention=attention)
    except ValueError as e:             # a backend that was asked for and cannot serve
        raise InputError(f"AGP_ATTENTION={attention}: {e}") from None
    except (MemoryError, RuntimeError) as e:      # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        from pipeline_dsl.units import format_size
        raise KVPoolError(f"the KV pool of {format_size(config.kv_budget_bytes)} ({num_blocks} blocks of "
                          f"{format_size(per_block)}) cannot be allocated on {device}: more memory than it "
                          f"can give; lower the budget") from None
    half = model.emulates_half()
    if half is not None:
        name, lacks = HALF_TYPES[half]
        advice = ("set dtype = auto (fp32 for dense weights here; a 4-bit GGUF's blocks on agp's int8 kernels) "
                  "or fp32 (agp serve: --dtype auto)")
        if runner.native is not None:       # its steps of up to native_max_batch rows run agp's kernels
            logging.getLogger("agp.engine").warning(
                "dtype %s on a CPU without %s in hardware (%s): steps of more than %d rows (a batch of more "
                "decodes, a prefill) compute the model's linears in fp32 from its %s weights converted every "
                "call (emulated %s GEMMs where oneDNN packs them), slower than fp32 weights; %s",
                config.dtype, name, lacks, runner.native_max_batch, name, name, advice)
        else:                               # no native step (none for fp16, or no library): every step pays
            why = " (agp's native step takes fp32 and bf16 weights, not fp16)" if half == torch.float16 else ""
            logging.getLogger("agp.engine").warning(
                "dtype %s on a CPU without %s in hardware (%s): every step runs slower than with fp32 weights: "
                "steps of up to %d rows on torch's emulated %s GEMMs%s, steps of more than %d rows computing "
                "the linears in fp32 from the %s weights converted every call; %s",
                config.dtype, name, lacks, EMULATED_HALF_ROWS, name, why, EMULATED_HALF_ROWS, name, advice)
    extra = {}
    if runner.device.type == "cuda" and not invariant:
        # every mode: compile and capture happen here, at load, never inside a request's TTFT
        extra["warm_up_s"] = runner.warm_up()
        if config.padding and graphs:
            got = runner.capture_graphs(config.max_batch_size, config.max_model_len or c.max_position,
                                        max_tokens=max(config.max_tokens_per_step, config.max_batch_size))
            extra.update(cuda_graphs=got["graphs"], piece_graphs=got["piece_graphs"],
                         graph_capture_s=got["capture_s"])
            if got.get("fallback"):         # the capture failed: steps run eagerly, and this says why
                extra["graphs_fallback"] = got["fallback"]
    extra["attention"] = runner.attention
    if runner.attention_fallback:
        extra["attention_fallback"] = runner.attention_fallback
    info = {"model": str(source.path), "dtype": str(model.dtype).replace("torch.", ""),
            "weights": model.weight_kind, "linears": model.linears_text(runner.native is not None),
            "device": device, "vocab_size": c.vocab_size,
            "context_length": c.max_position, "kv_bytes_per_block": per_block, "generation_config": sampling,
            "weight_bytes": model.weight_bytes(), "weights_shared": shared, **extra,
            "load_s": time.perf_counter() - t0}
    if end_tokens is not None:              # --generation-config FOLDER's: the engine ends on them
        info["end_token_ids"] = sorted(end_tokens)
    return runner, tokenizer, info


def _out_of_memory(e: BaseException) -> bool:
    """Whether an allocation failed for want of memory (CPU: "can't allocate memory"; CUDA: out of memory)."""
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e).lower()
    return "can't allocate memory" in text or "out of memory" in text


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB
