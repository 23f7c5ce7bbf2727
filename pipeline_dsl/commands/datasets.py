"""`agp bench --dataset-name random | sharegpt`: workloads drawn as `vllm bench serve` draws them.

    tokenizer, tokenizer_id = load_tokenizer("smollm2-135m-instruct")   # or a .gguf, an HF folder
    lines = random_lines(tokenizer, 200, input_len=1024, output_len=128, seed=0)
    lines = sharegpt_lines("ShareGPT_V3_unfiltered_cleaned_split.json", tokenizer, 200, seed=0)

Each is a list of request lines (`{"prompt": TEXT, "max_tokens": N}`, agp run's format), which
`agp bench` parses as it parses a --workload file's; the prompts are text sent to
/v1/completions (a server) or as a raw prompt (a pipeline), as vLLM's default `openai` backend
sends them.

random: each request's input length is drawn uniformly from [floor(L * (1 - r)), ceil(L * (1 + r))]
(L: --random-input-len less the special tokens the tokenizer adds to a prompt, r:
--random-range-ratio), its output length alike around --random-output-len (at least 1), with
numpy's generator seeded by --seed. Its prompt is --random-prefix-len tokens drawn once for every
request, then a run of consecutive token ids from a drawn offset, both from the vocabulary less
its special (and other added) tokens. The ids are decoded to text and the text encoded again: a
text does not always encode back into the ids it came from (two ids can merge, one can split), so
the ids are cut or drawn more of until the text encodes to the asked length (ten rounds at most),
and the server sees the length asked.

sharegpt: the file's conversations of at least two turns, shuffled with --seed (Python's
random.shuffle, as vLLM's), each one's first turn the prompt and the second's token count its
max_tokens (or --sharegpt-output-len); a prompt of fewer than 4 tokens or more than 1,024, an
answer of fewer than 4 (unless --sharegpt-output-len sets it) and a pair over 2,048 are left out,
as vLLM leaves them out.

Nothing is downloaded: a tokenizer is a model agp can load here (the embedded one by name, a
.gguf file) or a folder (or a tokenizer.json file) of a Hugging Face tokenizer.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from pipeline_dsl.commands.loadgen import BenchError, read_input

# vllm bench serve's defaults
RANDOM_INPUT_LEN, RANDOM_OUTPUT_LEN, NUM_PROMPTS = 1024, 128, 1000
# what vLLM's ShareGPT sampling keeps (its is_valid_sequence): lengths in tokens
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
_RETRIES = 10


def load_tokenizer(name: str):
    """(Tokenizer, its id for a saved result) of `name`: an embedded model's name, a .gguf file, a
    Hugging Face folder with a tokenizer.json (config.json not needed: a tokenizer's folder alone
    is enough), or a tokenizer.json. A BenchError says what is missing; nothing is downloaded."""
    from pipeline_dsl.engine.errors import InputError
    from pipeline_dsl.engine.models import resolve_model
    from pipeline_dsl.engine.tokenizer import Tokenizer, TokenizerError
    from pipeline_dsl.model_files import EMBEDDED_FILES, ModelFileProblem, model_file

    path = model_file(name)
    try:
        if path is None:                       # the embedded model's package is not installed: resolve says so
            resolve_model(name)
        if path.is_file() and path.name == "tokenizer.json":
            return Tokenizer.from_hf_folder(path.parent), name
        if path.is_dir() and (path / "tokenizer.json").is_file():
            return Tokenizer.from_hf_folder(path), name
        if path.is_dir() or name.strip().lower() in EMBEDDED_FILES or path.is_file():
            source = resolve_model(name)
            if source.kind == "hf":
                return Tokenizer.from_hf_folder(source.path), name
            from pipeline_dsl.engine.gguf_loader import read_metadata
            from pipeline_dsl.model_files.gguf_header import read_gguf_header

            return Tokenizer.from_gguf_metadata(read_metadata(read_gguf_header(source.path))), name
    except (InputError, TokenizerError, ModelFileProblem) as e:
        raise BenchError(f"the tokenizer {name!r}: {' '.join(str(e).split())}") from None
    known = ", ".join(sorted(EMBEDDED_FILES))
    raise BenchError(f"the tokenizer {name!r} is not here: give an embedded model ({known}), a .gguf file, or a "
                     f"Hugging Face folder (or tokenizer.json) on this machine; nothing is downloaded")


def pipeline_model(spec: str, allow_paths=()) -> str | None:
    """The model a pipeline target's first engine runs (its `,model=` setting first), read from
    the file without loading it: the tokenizer a drawn workload is counted with. None for a
    pipeline of python stages alone."""
    from pipeline_dsl.commands.loadgen import parse_target
    from pipeline_dsl.engine.models import DEFAULT_MODEL
    from pipeline_dsl.flow import load_graph
    from pipeline_dsl.flow.segment import segment_spec
    from pipeline_dsl.graph import segments_of

    path, settings = parse_target(spec)
    if settings.get("model"):
        return str(settings["model"])
    graph = load_graph(path, settings.get("pipeline"), allow_paths)
    for seg in segments_of(graph):
        return str(segment_spec(graph, seg).engine.get("model") or DEFAULT_MODEL)
    return None


def _special_count(tokenizer) -> int:
    """The tokens the tokenizer adds to a prompt (a BOS, an EOS), which the server counts too."""
    return int(getattr(tokenizer, "add_bos", False)) + int(getattr(tokenizer, "add_eos", False))


def random_bounds(tokenizer, *, input_len: int, output_len: int, range_ratio: float,
                  prefix_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((low, high) of the drawn input lengths, (low, high) of the output lengths), both ends
    included; the prompt is `prefix_len` tokens more, and the tokenizer's specials more again."""
    if not 0.0 <= range_ratio < 1.0:
        raise BenchError(f"--random-range-ratio must be at least 0 and below 1, not {range_ratio:g}")
    real = max(0, input_len - _special_count(tokenizer))
    lows = (math.floor(real * (1 - range_ratio)), max(math.floor(output_len * (1 - range_ratio)), 1))
    highs = (math.ceil(real * (1 + range_ratio)), max(math.ceil(output_len * (1 + range_ratio)), 1))
    if prefix_len + lows[0] < 1:
        raise BenchError(f"--random-input-len {input_len} with --random-range-ratio {range_ratio:g} and "
                         f"--random-prefix-len {prefix_len} can draw a prompt of no tokens (the tokenizer adds "
                         f"{_special_count(tokenizer)} of its own): raise --random-input-len or --random-prefix-len")
    return (lows[0], highs[0]), (lows[1], highs[1])


def random_lines(tokenizer, num: int, *, input_len: int = RANDOM_INPUT_LEN, output_len: int = RANDOM_OUTPUT_LEN,
                 range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0) -> list[dict]:
    """`num` request lines of random token text (the module's docstring says how they are drawn);
    the same seed draws the same lines."""
    (in_lo, in_hi), (out_lo, out_hi) = random_bounds(tokenizer, input_len=input_len, output_len=output_len,
                                                     range_ratio=range_ratio, prefix_len=prefix_len)
    rng = np.random.default_rng(seed)
    vocab = int(tokenizer.vocab_size)
    allowed = drawable_ids(tokenizer)
    if allowed.size == 0:
        raise BenchError("the tokenizer has no ordinary tokens to draw a prompt from")
    input_lens = rng.integers(in_lo, in_hi + 1, size=num)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num)
    offsets = rng.integers(0, vocab, size=num)
    prefix = allowed[rng.integers(0, allowed.size, size=prefix_len)].tolist() if prefix_len > 0 else []
    lines = []
    for i in range(num):
        inner = allowed[(int(offsets[i]) + i + np.arange(int(input_lens[i]))) % allowed.size].tolist()
        text = _text_of_length(tokenizer, prefix + inner, prefix_len + int(input_lens[i]), rng, allowed)
        lines.append({"prompt": text, "max_tokens": int(output_lens[i])})
    return lines


def drawable_ids(tokenizer) -> np.ndarray:
    """The token ids a random prompt is drawn from: the vocabulary less its special (and other
    added) tokens, as vLLM leaves out the special ones, and less those that are not text by
    themselves (a byte of a character, which decodes to U+FFFD and encodes back as three other
    tokens: a prompt of them missed its length by far)."""
    added = set(getattr(tokenizer, "added", {})) | set(getattr(tokenizer, "special_ids", ()))
    ids = [i for i in range(int(tokenizer.vocab_size))
           if i not in added and "\ufffd" not in tokenizer.decode([i])]
    return np.array(ids, dtype=np.int64)


def _text_of_length(tokenizer, ids: list[int], target: int, rng, allowed) -> str:
    """The text of `ids`, cut or lengthened until it encodes (without specials) to `target` tokens,
    at most _RETRIES rounds; then one still too long loses characters from its end until it fits
    (a cut through a character's bytes decodes to U+FFFD, which encodes longer), and one short
    takes the text of a drawn token more while that does not make it too long (_RETRIES tries).
    One that still misses is a token short (a warning of vLLM's says the same of its prompts)."""
    for _ in range(_RETRIES):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == target:
            return text
        if len(ids) > target:
            ids = ids[:target]
        else:
            ids = ids + allowed[rng.integers(0, allowed.size, size=target - len(ids))].tolist()
    text = tokenizer.decode(ids)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    while text and n > target:
        text = text[:-1]
        n = len(tokenizer.encode(text, add_special_tokens=False))
    for _ in range(_RETRIES):
        if n >= target:
            break
        more = text + tokenizer.decode([int(allowed[rng.integers(0, allowed.size)])])
        m = len(tokenizer.encode(more, add_special_tokens=False))
        if m <= target:
            text, n = more, m
    return text


def _json_lines(raw: bytes) -> list:
    """The records of a JSON Lines file (ValueError, the first line's, when it is not one)."""
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if not records:
        raise ValueError("the file is empty")
    return records


def sharegpt_lines(path: str | Path, tokenizer, num: int, *, output_len: int | None = None,
                   seed: int = 0) -> list[dict]:
    """Up to `num` request lines of a ShareGPT file (the module's docstring says which)."""
    path = Path(path)
    raw = read_input(path, "--dataset-path:", "a ShareGPT JSON file")
    try:
        try:
            data = json.loads(raw)
        except ValueError:
            data = _json_lines(raw)          # one record a line, as some copies of it are written
    except ValueError as e:
        raise BenchError(f"--dataset-path: {path} is not JSON ({e}): a ShareGPT file is one JSON list (or JSON "
                         f"Lines) of {{\"conversations\": [{{\"from\": ..., \"value\": ...}}, ...]}} records") from None
    if not isinstance(data, list):
        kind = {dict: "an object", str: "a string", bool: "a boolean"}.get(type(data), "a number" if data is not None
                                                                           else "null")
        raise BenchError(f"--dataset-path: {path} is not a ShareGPT file: it holds {kind}, not a JSON list of "
                         f"{{\"conversations\": [...]}} records")
    entries = [(i, e) for i, e in enumerate(data) if isinstance(e, dict)
               and isinstance(e.get("conversations"), list) and len(e["conversations"]) >= 2]
    random.Random(seed).shuffle(entries)
    lines = []
    for i, entry in entries:
        if len(lines) >= num:
            break
        turns = entry["conversations"][:2]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            raise BenchError(f"--dataset-path: {path}: record {i} (from 0): its first two turns must each be "
                             f"{{\"from\": ..., \"value\": TEXT}}")
        prompt_len = len(tokenizer.encode(turns[0]["value"]))
        answer_len = len(tokenizer.encode(turns[1]["value"])) if output_len is None else output_len
        if (prompt_len < SHAREGPT_MIN_LEN or (output_len is None and answer_len < SHAREGPT_MIN_LEN)
                or prompt_len > SHAREGPT_MAX_PROMPT or prompt_len + answer_len > SHAREGPT_MAX_TOTAL):
            continue
        lines.append({"prompt": turns[0]["value"], "max_tokens": answer_len})
    if not lines:
        raise BenchError(f"--dataset-path: {path} holds no conversation of two turns whose prompt is "
                         f"{SHAREGPT_MIN_LEN} to {SHAREGPT_MAX_PROMPT} tokens and whose pair is at most "
                         f"{SHAREGPT_MAX_TOTAL}")
    return lines
