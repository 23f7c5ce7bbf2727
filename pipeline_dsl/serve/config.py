"""What the HTTP app of `agp serve` is configured with: one frozen dataclass, kept on
`app.state.config` and read by every route (serve/routes.py) and the guard (serve/guard.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

OPEN_PATHS = ("/health", "/ping", "/metrics", "/version", "/openapi.json")   # answered without an API key
# an id the client sends is kept when it is short and printable (it is echoed in a header and logs)
CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")
PROBES = ("/health", "/ping")          # they say "loading" or "draining" themselves (every other route: an error)
WATCHED = ("/metrics", "/stats")       # still answered while the server drains: the drain is watched through them
# the requests agp_requests_total counts by status, refused ones (401, 503 ...) too
COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                 "/v1/score", "/score", "/v1/rerank", "/rerank", "/v2/rerank")
# Azure OpenAI's routes of the same (serve/routes.py), their deployment in the path: counted too
AZURE_PATH = re.compile(r"/openai/deployments/[^/]+/(chat/completions|completions|embeddings)")


RETRY_AFTER_S = 1      # the Retry-After of a 429 or 503 unless --retry-after-s says (while loading: loading.py's)


def counted(path: str) -> bool:
    """Whether agp_requests_total counts a POST to `path` (below the root path)."""
    return path in COUNTED_PATHS or AZURE_PATH.fullmatch(path) is not None


@dataclass(frozen=True)
class ServeConfig:
    model_names: tuple[str, ...]           # the ids requests may name; the first is the default
    max_model_len: int                     # context length: max_tokens beyond it is a 400
    stages: tuple[tuple[str, str], ...] = ()   # (generate stage, its model) a request may name
    loras: tuple = ()                      # serve.lora.Served: the LoRA adapters a request may name (in model_names too)
    stage_loras: tuple[tuple[str, str], ...] = ()   # (generate stage, its own LoRA adapter's folder name: its `lora`)
    retry_after_s: int = RETRY_AFTER_S     # Retry-After of a 429 / 503 (--retry-after-s)
    drain_timeout_s: float = 60.0          # at shutdown: how long in-flight requests may take
    max_body_bytes: int = 4 << 20          # a longer request body is a 413
    max_prompt_chars: int | None = None    # the longest prompt any engine can take, in characters
    body_timeout_s: float = 30.0           # a body's grace, and the longest pause in it (408); see body_min_rate
    body_min_rate: float = 500.0           # bytes/s: each buys a body 1/rate s more past its grace (0: none)
    max_connections: int = 1024            # requests served at once (their bodies complete); more get a 503
    max_body_bytes_arriving: int = 256 << 20   # bytes of bodies still arriving, all together; more: 503
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values accepted (a 400 otherwise); "*": any
    max_stage_n: int = 1                   # the largest n of the pipeline's generate stages
    # agp serve MODEL: what a /v1/completions request that sets no max_tokens generates at most (vLLM's and
    # OpenAI's completions default, 16, or less where the model's generation config says); None: the
    # generate stage's max_new_tokens, as for chat
    completion_max_tokens: int | None = None
    lenient: bool = False                  # unknown request fields: logged and ignored, not a 400
    api_keys: tuple[str, ...] = ()         # when given, every route but OPEN_PATHS wants one (401)
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*": any)
    stats_interval_s: float = 10.0         # a stats log line this often while busy (0: none)
    trace_path: str | None = None          # the Chrome trace is written here (flush, shutdown)
    # HTTP headers copied into the request item's `headers` (lower-case): those --request-headers
    # names, then those the pipeline's conditions compare
    request_headers: tuple[str, ...] = ()
    exclude_tools_when_tool_choice_none: bool = False   # vLLM's flag: such a request's tools stay out of its prompt
    return_tokens_as_token_ids: bool = False   # vLLM's flag: logprobs name tokens "token_id:N" unless a request says false
    root_path: str = ""                    # the prefix a proxy serves under: routes answer with and without it
    system_fingerprint: str | None = None  # OpenAI's: the configuration answers come from (build.system_fingerprint)
    quiet_paths: tuple[str, ...] = ()      # their successful answers write no access line (probes, scrapes)
