"""The built-in stage kinds, as typed schemas.

The seed's chain, whose middle is one engine segment (batcher, tokeniser, KV cache, model):

    requests -> dynamic_batch -> encode -> kv_lookup -> generate -> respond
      host        host            host      copy        compute      host

and the request-level kinds around it: system_prompt, python (a user function), route
(conditions on edges), join (merge the branches of a request).

Defaults marked FROM_MODE come from the pipeline's mode (pipeline_dsl/modes.py);
a plain default may also be changed by the mode (max_batch_size). A stage's own
setting in the file always wins. Runtime implementations are in stages/impl.py (the `impl` of each kind).
"""

from __future__ import annotations

from .schema import (ANY_LABEL, BOOL, DURATION, ENUM, FLOAT, FROM_MODE, INT, LIST_STR, MAP, REQUIRED, SIZE, STR,
                     Param, Port, StageKind)

REQUESTS = StageKind(
    name="requests",
    doc="The request source: accepts prompts (a file for `agp run`, HTTP for `agp serve`) into a bounded queue.",
    params=(
        Param("max_queue", INT, 1024, "requests waiting at most; more are refused (HTTP 429)", min=1, max=1 << 20),
        Param("max_prompt_tokens", INT, 0, "longest prompt accepted, in tokens (0 = the model's context)",
              min=0, max=1 << 24),
    ),
    outputs=(Port("requests", "Request"),),
    resource="host",
    impl="stages.impl:Requests",
)

SYSTEM_PROMPT = StageKind(
    name="system_prompt",
    doc="The shared system prompt: puts one system message first in every chat request that has none; "
        "kv_lookup's prefix reuse serves its KV blocks from cache.",
    params=(
        Param("text", STR, REQUIRED, "the system message put first in each chat request"),
        Param("override", BOOL, False, "replace a request's own system message too"),
    ),
    inputs=(Port("requests", "Request"),),
    outputs=(Port("requests", "Request"),),
    resource="host",
    impl="stages.impl:SystemPrompt",
)

DYNAMIC_BATCH = StageKind(
    name="dynamic_batch",
    doc="The batch decision: merges requests into batches of at most max_batch_size within a timeout "
        "window; emits `full` when a batch fills and `timeout` when the window expires.",
    params=(
        Param("max_batch_size", INT, 32, "sequences in one batch at most (the mode presets 8 | 32 | 64)",
              min=1, max=4096),
        Param("timeout", DURATION, 0.001, "how long a batch waits for more requests", min=0.0, max=60.0),
        Param("padding", BOOL, True, "pad the batch to a bucket size so shapes stay static"),
        Param("policy", ENUM, "continuous", "continuous: sequences join and leave between steps; "
              "static: a batch runs to completion", choices=("continuous", "static")),
        Param("scheduling_policy", ENUM, "fcfs", "which waiting request is admitted first: fcfs: in order of "
              "arrival; priority: by the request's `priority` (lower first, ties by arrival), and out of KV "
              "blocks the lowest-priority running sequence is preempted", choices=("fcfs", "priority")),
        Param("max_tokens_per_step", INT, 512, "token budget of one step (decodes + prefill chunks)",
              min=1, max=1 << 20),
        Param("itl_target", DURATION, 0.5, "while sequences decode, a step's prefill is cut to what the "
              "engine measured it can compute in this long, so a long prompt delays the others' next "
              "token by about this much (CPU; 0 = prefill_chunk alone)", min=0.0, max=60.0),
        Param("long_prefill_threshold", INT, 1024, "a prompt with more tokens than this left to prefill (its prefix-cache hit "
              "taken off) is long: "
              "while a request whose prompt is not long waits or prefills, long prompts together take at most "
              "half of a step's prefill tokens, so the short one is admitted beside them (vLLM's "
              "long_prefill_token_threshold; 0 = off)", min=0, max=1 << 30),
    ),
    inputs=(Port("requests", "Request"),),
    outputs=(Port("batch", "Batch"),),
    resource="host",
    conditions=("full", "timeout"),
    impl="stages.impl:DynamicBatch",
)

ENCODE = StageKind(
    name="encode",
    doc="Unified encode: applies the model's chat template and tokenises the batch.",
    params=(
        Param("chat_template", BOOL, True, "render chat messages with the model's own template"),
        Param("add_special_tokens", BOOL, True, "add the tokenizer's BOS/EOS tokens"),
    ),
    inputs=(Port("batch", "Batch"),),
    outputs=(Port("tokens", "Tokens"),),
    resource="host",
    impl="stages.impl:Encode",
)

KV_LOOKUP = StageKind(
    name="kv_lookup",
    doc="KV-cache lookup: finds the longest cached prefix of each prompt in the paged KV pool "
        "(blocks hashed by parent + tokens) so it is not recomputed.",
    params=(
        Param("reuse", ENUM, "prefix", "prefix: share cached blocks of common prefixes; none: never reuse",
              choices=("prefix", "none")),
        Param("block_size", INT, 16, "tokens per KV block", min=1, max=1024),
        Param("budget", SIZE, FROM_MODE, "memory of the KV pool (the mode presets 64MiB | 256MiB | 1GiB)",
              min=1 << 16, max=1 << 40),
    ),
    inputs=(Port("tokens", "Tokens"),),
    outputs=(Port("cached", "CachedTokens"),),
    resource="copy",
    impl="stages.impl:KVLookup",
)

GENERATE = StageKind(
    name="generate",
    doc="Generate output: prefill and decode on the model, sampling each next token. Each generate "
        "stage may name its own model (two models in one pipeline run as two engines); several "
        "generate stages fed by one kv_lookup share its engine and differ in their sampling settings.",
    params=(
        Param("max_new_tokens", INT, 128, "tokens generated per request that sets no max_tokens of its own",
              min=1, max=1 << 20),
        Param("temperature", FLOAT, 0.0, "0 = greedy; higher = more random", min=0.0, max=2.0),
        Param("top_p", FLOAT, 1.0, "nucleus sampling: keep the smallest set with this probability mass",
              min=0.0, max=1.0, min_exclusive=True),
        Param("top_k", INT, 0, "keep the k most likely tokens (0 or -1 = all)", min=-1, max=1 << 20),
        # a signed 64-bit integer, as vLLM and OpenAI take it: torch's manual_seed also takes
        # 2**63 .. 2**64-1, but those are the negative seeds again (two's complement), not new ones
        Param("seed", INT, None, "random seed for sampling, a signed 64-bit integer (none = nondeterministic)",
              min=-(1 << 63), max=(1 << 63) - 1, optional=True),
        Param("stop", LIST_STR, (), "strings that end generation (at most 1024, each up to 256 characters, "
              "4096 characters in all: the matcher's automaton has a state per character, and its cost per "
              "token does not grow with the strings)", max_items=1024, max_length=256, max_total=4096),
        Param("ignore_eos", BOOL, False, "keep generating past the end-of-sequence token"),
        Param("n", INT, 1, "answers sampled per request (they share the prompt's KV blocks); each "
              "goes on as its own item, e.g. into a join", min=1, max=64),
        Param("presence_penalty", FLOAT, 0.0, "subtracted from the logit of every token already in the "
              "answer (OpenAI's presence_penalty; > 0: fewer repeated topics)", min=-2.0, max=2.0),
        Param("frequency_penalty", FLOAT, 0.0, "subtracted from a token's logit once per time it is already "
              "in the answer (OpenAI's frequency_penalty)", min=-2.0, max=2.0),
        Param("repetition_penalty", FLOAT, 1.0, "divides the positive logits (multiplies the negative ones) of "
              "tokens in the prompt or the answer (vLLM / HF; 1 = off)", min=0.0, max=2.0, min_exclusive=True),
        Param("min_p", FLOAT, 0.0, "drop tokens less likely than min_p times the likeliest one (0 = off)",
              min=0.0, max=1.0),
        Param("min_tokens", INT, 0, "tokens generated before end-of-sequence or a stop token id may be "
              "sampled", min=0, max=1 << 20),
        # vLLM's bad_words (at most 128 words); the engine bans each word's token sequences
        # (processors.py). A word of whitespace alone is no word for any tokenizer (vLLM strips it)
        Param("bad_words", LIST_STR, (), "words never generated: each word's tokens, with and without a "
              "leading space, as vLLM bans them (at most 128, each up to 256 characters)", max_items=128,
              max_length=256, nonblank=True),
        Param("json_schema", STR, None, "a JSON Schema file, relative to the .agp file, that every answer "
              "of this stage must follow (constrained decoding), but one whose request brings its own "
              "response_format or forced tool call", optional=True),
        Param("model", STR, None, "this stage's model (default: the pipeline's `model`)", optional=True,
              inherits="model"),
        Param("lora", STR, None, "a LoRA adapter this stage answers with: a PEFT folder (adapter_config.json, "
              "adapter_model.safetensors) relative to the .agp file, applied beside the model's weights (a "
              "request naming an adapter of agp serve --lora-modules takes that one instead)", optional=True),
        Param("device", STR, None, "this stage's device: auto | cpu | cuda | cuda:N, a word or a string "
              "(default: the pipeline's `device`)", optional=True,
              inherits="device"),
        Param("dtype", ENUM, FROM_MODE, "weights and compute precision (int8 = weight-only int8; default: "
              "the pipeline's `dtype`, else the mode's int8 | auto | auto)",
              choices=("auto", "fp32", "bf16", "fp16", "int8"), inherits="dtype"),
        Param("compile", BOOL, FROM_MODE, "torch.compile the decode step (the mode presets false | false | true)"),
        Param("prefill_chunk", INT, 256, "prompt tokens prefilled per step (chunked prefill)", min=1, max=1 << 20),
        Param("speculate", ENUM, "off", "speculative decoding: off, or ngram (drafts looked up in the sequence's "
              "own prompt and output, verified in one forward; vLLM's method = ngram)", choices=("off", "ngram")),
        Param("speculative_tokens", INT, 4, "drafted tokens verified per step (speculate = ngram; vLLM's "
              "num_speculative_tokens)", min=1, max=16),
        Param("prompt_lookup_max", INT, 4, "longest suffix looked up for a draft (speculate = ngram)", min=1, max=64),
        Param("prompt_lookup_min", INT, 2, "shortest suffix looked up for a draft, at most prompt_lookup_max "
              "(speculate = ngram)", min=1, max=64),
    ),
    inputs=(Port("cached", "CachedTokens"),),
    outputs=(Port("generated", "Generated"),),
    resource="compute",
    impl="stages.impl:Generate",
)

RESPOND = StageKind(
    name="respond",
    doc="Respond: each Generated item that reaches it becomes one answer (one choice) of its request; "
        "the request is answered once none of its items is left in the pipeline.",
    params=(),
    inputs=(Port("generated", "Generated"),),
    resource="host",
    impl="stages.impl:Respond",
)

# how a stage that runs user code runs it (python; join's fn): its own workers, a timeout, retries
POLICY_PARAMS = (
    Param("workers", INT, 16, "calls of this stage at once (threads of its own; async functions: tasks "
          "on its event loop); more items wait in its queue, other stages do not; also the most hung "
          "calls (past their timeout, still running) it keeps before failing new ones at once",
          min=1, max=1024),
    Param("timeout", DURATION, 0.0, "longest one call may take (0 = no limit; a stream stage: its own "
          "time per chunk, not the wait for chunks); past it the request fails with a timeout, or the "
          "call is retried (see retries)", min=0.0, max=86400.0),
    Param("retries", INT, 0, "calls tried again after a transient error: TimeoutError (the timeout "
          "too), ConnectionError, an HTTP 408/425/429/5xx status, pipeline_dsl.Retry", min=0, max=10),
    Param("backoff", DURATION, 0.5, "wait before the first retry, doubled for each next one (jittered, "
          "at most 30s)", min=0.0, max=60.0),
)

PYTHON = StageKind(
    name="python",
    doc="Calls a Python function on each item: fn = \"module:function\" (the module is looked up beside "
        "the .agp file, then on sys.path). The function gets the item as a plain dict (a Request: id, "
        "messages or prompt, sampling fields, metadata; a Generated result: id, text, finish_reason, "
        "usage, request) and returns the dict (changed in place or a new one), a label string that "
        "`when LABEL` edges match, or raises pipeline_dsl.Reject(\"why\") to refuse the request. A "
        "returned Request goes on along the out-edges that lead where Requests are taken, a Generated "
        "result along those that lead to a respond stage; `returns` says which it may give (`returns = many`: a "
        "list of requests, each going on as its own item to a join that collects them in list order). An `async "
        "def` runs on an event loop of its stage's own; each stage has its own workers, and may set a timeout, "
        "retries and a result cache. With stream = true the function is a generator that filters the "
        "text as it is generated.",
    params=(
        Param("fn", STR, REQUIRED, "the function to call, as \"module:function\""),
        Param("args", MAP, None, "keyword arguments the function is called with, fn(item, **args) "
              "(a stream's fn(item, chunks, **args)): {top_k = 3, label = \"math\"}; strings, numbers, "
              "booleans and lists of them", optional=True),
        Param("max_turns", INT, None, "bounds a loop through this stage: after max_turns calls for one "
              "request its items leave the loop (the edges out of it) without a call", min=1, max=1000,
              optional=True),
        Param("returns", ENUM, "same", "what the function returns: same (the type it got), request, "
              "generated, or any (either; e.g. a tool step that loops back or answers); many: a list of "
              "requests, each its own item on to the join that collects them (a fan-out as wide as the list)",
              choices=("same", "request", "generated", "any", "many")),
        Param("max_items", INT, 64, "returns = many: the longest list one call may return; a longer one fails "
              "its request at this stage", min=1, max=4096),
        *POLICY_PARAMS,
        Param("cache", INT, 0, "results kept, keyed by the item's content without its id (the least "
              "recently used is dropped first); 0 = no cache", min=0, max=1 << 20),
        Param("cache_ttl", DURATION, 0.0, "how long a cached result is used (0 = until it is dropped)",
              min=0.0, max=30 * 86400.0),
        Param("stream", BOOL, False, "filter generated text as it is made: fn is a generator that gets "
              "(item, chunks) and yields the text it lets through; a stream after generate reaches "
              "the client chunk by chunk"),
    ),
    inputs=(Port("items", "Request|Generated"),),
    outputs=(Port("items", "Request|Generated"),),
    resource="host",
    conditions=(ANY_LABEL,),
    impl="stages.impl:Python",
)

ROUTE = StageKind(
    name="route",
    doc="Routes each item: it goes along the first conditional out-edge whose condition holds "
        "(`when prompt_tokens > 512`), else the `otherwise` edge, and along every unconditional edge.",
    params=(),
    inputs=(Port("items", "Request|Generated"),),
    outputs=(Port("items", "Request|Generated"),),
    resource="host",
    passthrough=True,
    impl="stages.impl:Route",
)

JOIN = StageKind(
    name="join",
    doc="Waits for every branch of a request (the copies made by fan-out or by generate's n) and "
        "merges them into one result: first (the first to arrive), majority (the most common answer, "
        "compared after normalising case, spaces and trailing punctuation), longest, or fn = "
        "\"module:function\" (gets the list of results as dicts, returns one of them or a new one).",
    params=(
        Param("policy", ENUM, "first", "how branches merge", choices=("first", "majority", "longest", "fn")),
        Param("fn", STR, None, "the merge function for policy = fn, as \"module:function\"", optional=True),
        Param("args", MAP, None, "keyword arguments fn is called with, fn(results, **args)", optional=True),
        Param("on_reject", ENUM, "fail", "a Reject in one branch: fail the request (fail), or merge the "
              "other branches without it (drop; if every branch is rejected the request fails)",
              choices=("fail", "drop")),
        *POLICY_PARAMS,               # how fn's calls run, as a python stage's (the built-in policies: inline)
    ),
    inputs=(Port("generated", "Generated"),),
    outputs=(Port("generated", "Generated"),),
    resource="host",
    impl="stages.impl:Join",
)

BUILTIN_KINDS = (REQUESTS, SYSTEM_PROMPT, DYNAMIC_BATCH, ENCODE, KV_LOOKUP, GENERATE, RESPOND, PYTHON, ROUTE, JOIN)
