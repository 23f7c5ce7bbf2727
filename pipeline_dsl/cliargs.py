"""Value types of the flags that `agp`'s commands share (argparse `type=`).

A bad value is refused while the command line is parsed, before any model loads: argparse
prints the command's usage and `agp CMD: error: argument --flag: …`, exit status 2. Without
these, a `--stats` that names a folder or a `--warmup -1` surfaced only after the whole run,
as an internal error or as a silently odd measurement.

    p.add_argument("--stats", type=output_file)          # a file to write: not a folder, in a folder that exists
    p.add_argument("--warmup", type=count(0))             # an integer >= 0
    p.add_argument("--request-timeout", type=seconds)     # a finite number of seconds > 0
    p.add_argument("--url", type=http_url)                # http(s)://host[:port][/path]
    p.add_argument("--override-generation-config", type=override_generation_config)   # a JSON object

The AGP_* variables' switches take one vocabulary (`switch`, `env_switch`): a flag's variable
(AGP_NO_ACCESS_LOG=1) as the engine's (AGP_BATCH_INVARIANT=1, AGP_NATIVE=0), so `false` is
never read as on.
"""
from __future__ import annotations

import argparse
import math
import os
import signal

CLOSED_PIPE = 128 + signal.SIGPIPE              # 141: the exit of a command whose reader went, as `yes | head -1`'s yes
MAX_COUNT = 10_000_000        # requests, clients: more cannot be held in memory as a list of arrivals


def output_file(text: str) -> str:
    """A path agp will create or replace: refused when it is a folder or its folder is missing
    or not writable (checked now, so the run's work is not lost at the end)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file name")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"'{text}' is a folder: give a file name in it")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write '{text}': the folder {folder} does not exist")
    writable = os.access(text, os.W_OK) if os.path.exists(text) else os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise argparse.ArgumentTypeError(f"cannot write '{text}': {_why_not(folder)}")
    return text


def _why_not(folder: str) -> str:
    """Why a folder (or a file in it) cannot be written: a read-only file system (a container's
    image: chmod would not help, a volume would) or permissions."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return f"{folder} is on a read-only file system" if read_only else "permission denied"


def output_file_of(*formats: str):
    """An output_file whose extension is one of `formats`: its writer picks the format by it (a
    plot named .txt failed at the end of a benchmark, after all its work)."""
    def parse(text: str) -> str:
        text = output_file(text)
        if os.path.splitext(text)[1].lower().lstrip(".") not in formats:
            *rest, last = ["." + f for f in formats]
            ends = f"{', '.join(rest)} or {last}" if rest else last
            raise argparse.ArgumentTypeError(f"'{text}' must end in {ends} (the format is the extension's)")
        return text
    return parse


def output_file_or_folders(text: str) -> str:
    """As output_file, for a writer that creates the missing folders of its path (agp render):
    the nearest folder that exists must be writable."""
    if text and not os.path.isdir(text):
        folder = os.path.dirname(os.path.abspath(text))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"cannot write '{text}': {folder} is a file, not a folder")
        if not os.path.isdir(os.path.dirname(os.path.abspath(text))):
            if not os.access(folder, os.W_OK | os.X_OK):
                why = _why_not(folder)
                raise argparse.ArgumentTypeError(f"cannot write '{text}': {why}"
                                                 + (f" in {folder}" if why == "permission denied" else ""))
            return text
    return output_file(text)


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def switch(text: str) -> bool:
    """A switch's value: 1, true, yes, on or 0, false, no, off (any case); else a ValueError."""
    word = text.strip().lower()
    if word not in SWITCH_WORDS:
        raise ValueError("expected true or false (1 or 0)")
    return SWITCH_WORDS[word]


def env_switch(name: str, default: bool, environ=None) -> bool:
    """The switch variable `name` (unset or empty: `default`); another word is a ValueError
    that names the variable."""
    raw = (os.environ if environ is None else environ).get(name, "")
    if not raw.strip():
        return default
    try:
        return switch(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r}: {e}") from None


def count(low: int, high: int = MAX_COUNT):
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high:,}, not {value}")
        return value
    return parse


def positive_number(text: str, unit: str, zero: bool = False) -> float:
    """A finite, positive number of `unit` (seconds, milliseconds); 0 too where `zero`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of {unit}") from None
    if not ((value >= 0 if zero else value > 0) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {'0 or ' if zero else ''}a positive number of {unit}, not {text}")
    return value


def seconds(text: str) -> float:
    """A finite, positive number of seconds."""
    return positive_number(text, "seconds")


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 or more (0: the wait it bounds is skipped)."""
    return positive_number(text, "seconds", zero=True)


def http_url(text: str) -> str:
    """A server's base URL: an http or https scheme and a host (a port, if given, in range);
    `localhost:8000` or `notaurl` would otherwise fail only once the pipelines before it ran."""
    from urllib.parse import urlsplit

    example = "e.g. http://127.0.0.1:8000"
    try:
        parts = urlsplit(text)
        port = parts.port                 # ValueError when not a number in 0-65535
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"'{text}' is not a valid URL ({e}); {example}") from None
    if parts.scheme.lower() not in ("http", "https"):
        got = f"its scheme is '{parts.scheme}'" if parts.scheme and parts.netloc else "it has no scheme"
        raise argparse.ArgumentTypeError(f"'{text}' is not an http(s) URL: {got}; give http:// or https://, {example}")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"'{text}' names no host; {example}")
    if port == 0:
        raise argparse.ArgumentTypeError(f"'{text}': port 0 cannot be connected to; {example}")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"'{text}': a server's base URL has no ?query or #fragment; {example}")
    endpoint = parts.path.rstrip("/").lower()
    if endpoint.endswith(("/completions", "/models", "/embeddings", "/responses")):
        raise argparse.ArgumentTypeError(
            f"'{text}' is an endpoint, not a server's base URL: give http://HOST:PORT or http://HOST:PORT/v1 "
            "(each request goes to /v1/chat/completions or /v1/completions, as its workload line is a chat "
            "or a prompt)")
    return text


GENERATION_CONFIG_HELP = ("the requests' sampling defaults: auto (a Hugging Face folder's generation_config.json "
                          "sets temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens where the "
                          "request and its generate stage set none, as vLLM's default), vllm (it does not), or a "
                          "folder whose generation_config.json does (default: auto)")


def generation_config(text: str) -> str:
    """vLLM's --generation-config: auto, vllm, or a folder holding a generation_config.json."""
    if text in ("auto", "vllm"):
        return text
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"'{text}' is neither auto, vllm nor a folder")
    if not os.path.isfile(os.path.join(text, "generation_config.json")):
        raise argparse.ArgumentTypeError(f"the folder '{text}' holds no generation_config.json")
    return text


def reasoning_parser(value: str) -> str:
    """--reasoning-parser's value (agp serve's and agp run's): a form agp splits reasoning in
    (pipeline_dsl/reasoning.py), else the error naming those it reads."""
    from pipeline_dsl.reasoning import check_parser

    try:
        return check_parser(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


OVERRIDE_GENERATION_CONFIG_HELP = ("JSON object of generation_config.json keys (temperature, top_p, top_k, min_p, "
                                   "repetition_penalty, max_new_tokens) set over the defaults --generation-config "
                                   "gives, e.g. '{\"temperature\": 0.5}'; null unsets one (vLLM's flag)")


def override_generation_config(text: str) -> dict:
    """vLLM's --override-generation-config: a JSON object of generation_config.json sampling keys,
    each value in its field's range (stages.fields.check_generation_override)."""
    import json

    from stages.fields import check_generation_override

    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("not a JSON object of sampling keys (nested too deeply to read)") from None
    try:
        return check_generation_override(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


SPECULATIVE_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
SPECULATIVE_CONFIG_HELP = ("speculative decoding, as vLLM's flag takes it: a JSON object of "
                           f"{', '.join(SPECULATIVE_KEYS)}; agp has method ngram (prompt lookup), e.g. "
                           "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}' "
                           "(overrides generate's speculate parameters)")


def speculative_config(text: str) -> dict:
    """vLLM's --speculative-config for its ngram method -> the EngineConfig fields it sets (speculate,
    speculative_tokens, prompt_lookup_max, prompt_lookup_min). A lookup length left out is vLLM's:
    both out, 5 each; one out, the other's. Another method or key: an error naming what agp reads."""
    import json

    from stages.fields import ParamError, check_engine_field, check_prompt_lookup

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not a JSON object ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of {', '.join(SPECULATIVE_KEYS)}")
    unknown = sorted(set(value) - set(SPECULATIVE_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(f"agp does not read {', '.join(map(repr, unknown))}: it takes "
                                         f"{', '.join(SPECULATIVE_KEYS)} (method ngram only)")
    method = value.get("method")
    if method not in ("ngram", "[ngram]"):
        raise argparse.ArgumentTypeError(f"method {json.dumps(method)} is not one agp has: it speculates by "
                                         "method \"ngram\" (prompt lookup) only, with num_speculative_tokens, "
                                         "prompt_lookup_max and prompt_lookup_min")
    low, high = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
    if low is None and high is None:
        low = high = 5
    low, high = (high if low is None else low), (low if high is None else high)
    out = {"speculate": "ngram", "prompt_lookup_max": high, "prompt_lookup_min": low}
    if value.get("num_speculative_tokens") is not None:
        out["speculative_tokens"] = value["num_speculative_tokens"]
    names = {"speculative_tokens": "num_speculative_tokens"}
    try:
        for field, v in out.items():
            out[field] = check_engine_field(field, v)
    except ParamError as e:
        raise argparse.ArgumentTypeError(f"{names.get(field, field)}: {e}") from None
    try:
        check_prompt_lookup(out["prompt_lookup_min"], out["prompt_lookup_max"])
    except ParamError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


# --dtype: agp's names and vLLM's (`--dtype bfloat16`, `half`, `float`), each to agp's
DTYPE_NAMES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16",
               "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16", "int8": "int8"}


def dtype(text: str) -> str:
    """A precision as agp names it (auto, fp32, bf16, fp16, int8) or as vLLM's --dtype does."""
    if text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"'{text}' is none of auto, fp32, bf16, fp16, int8 (or vLLM's "
                                         "float32, float, bfloat16, float16, half)")
    return DTYPE_NAMES[text]


def add_dtype_argument(p: argparse.ArgumentParser, whose: str = "the pipeline's") -> None:
    p.add_argument("--dtype", type=dtype, default=None, metavar="auto|fp32|bf16|fp16|int8",
                   help=f"override {whose} precision (vLLM's bfloat16, float16, half, float32 are taken too)")


_SUFFIXES = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def token_count(text: str) -> int | None:
    """A number of tokens as vLLM's --max-model-len takes it: an integer, or one with a suffix,
    k, m, g decimal and K, M, G binary (32k: 32,000; 32K: 32,768; 25.6k: 25,600); `auto` or -1
    (vLLM's: as much as memory holds) is None, the flag left out, which is that already (the
    model's context, or less where the KV pool holds fewer). Its range is the flag's to check."""
    import re
    from decimal import Decimal

    if text.strip() in ("auto", "-1"):
        return None
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of tokens (an integer, or one with a suffix: "
                                         "32k = 32000, 32K = 32768)")
    number, suffix = m.groups()
    value = Decimal(number) * _SUFFIXES.get(suffix, 1)          # exact: 25.6k is 25600, not 25600.000000000004
    if value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of tokens")
    return int(value)
