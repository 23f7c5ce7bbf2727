"""agp bench's vllm bench serve datasets (--dataset-name random | sharegpt) and saved results
(--save-result): lengths as asked, counted by the tokenizer and by the engine; the saved file's
keys and values as the printed table shows them; bad options exit 2 saying what and where."""
import json
import math
import os
import re
from pathlib import Path

import pytest

from pipeline_dsl.cli import main as agp
from pipeline_dsl.commands import datasets as D
from pipeline_dsl.model_files import model_file

from test_serve import LiveServer, _pipeline_file
from tiny_model import write_tiny_gguf

# the keys vllm bench serve --save-result writes (those of --save-detailed apart)
VLLM_KEYS = {"date", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
             "max_concurrency", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
             *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el"))}
DETAILED = {"input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"}


@pytest.fixture(scope="module")
def bos_gguf(tmp_path_factory):
    """The tiny model whose tokenizer starts each prompt with its BOS: one special token a drawn
    prompt leaves room for, as the server counts it."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "bos.gguf", add_bos=True)


def _bounds(input_len, output_len, ratio, prefix=0, specials=0):
    real = input_len - specials
    return ((prefix + math.floor(real * (1 - ratio)) + specials, prefix + math.ceil(real * (1 + ratio)) + specials),
            (max(math.floor(output_len * (1 - ratio)), 1), math.ceil(output_len * (1 + ratio))))


@pytest.mark.parametrize("model", ["bos", "smollm2-135m-instruct"])
def test_random_prompts_have_the_asked_token_lengths_within_the_range_ratio(bos_gguf, model):
    """Each prompt, encoded as the server encodes it (its BOS too), is of a length drawn from
    [L(1-r), L(1+r)] plus the prefix; the ids were decoded to text and the text encoded again, so
    what is sent is the length asked (a byte-level vocabulary's odd bytes, a BPE's merges)."""
    name = str(bos_gguf) if model == "bos" else model
    if model != "bos" and model_file(model) is None:
        pytest.skip("the embedded model is not installed")
    tok, tokenizer_id = D.load_tokenizer(name)
    specials = int(tok.add_bos) + int(tok.add_eos)
    assert tokenizer_id == name and specials == (1 if model == "bos" else 0)
    lines = D.random_lines(tok, 40, input_len=40, output_len=8, range_ratio=0.25, prefix_len=3, seed=7)
    (lo, hi), (out_lo, out_hi) = _bounds(40, 8, 0.25, prefix=3, specials=specials)
    lens = [len(tok.encode(line["prompt"])) for line in lines]
    assert all(lo <= n <= hi for n in lens), (lo, hi, lens)
    assert len(set(lens)) > 3                                   # drawn, not all the same
    assert all(out_lo <= line["max_tokens"] <= out_hi for line in lines)
    assert len({line["max_tokens"] for line in lines}) > 1
    ids = [i for line in lines for i in tok.encode(line["prompt"], add_special_tokens=False)]
    assert not set(ids) & tok.special_ids                       # no special token drawn
    assert os.path.commonprefix([line["prompt"] for line in lines])    # --random-prefix-len: one for all


def test_a_range_ratio_of_0_gives_every_prompt_the_asked_length(bos_gguf):
    tok, _ = D.load_tokenizer(str(bos_gguf))
    lines = D.random_lines(tok, 10, input_len=30, output_len=5, seed=1)
    assert [len(tok.encode(line["prompt"])) for line in lines] == [30] * 10
    assert [line["max_tokens"] for line in lines] == [5] * 10


def test_the_same_seed_draws_the_same_prompts_and_another_seed_others(bos_gguf):
    tok, _ = D.load_tokenizer(str(bos_gguf))
    kw = dict(input_len=24, output_len=6, range_ratio=0.5, prefix_len=2)
    assert D.random_lines(tok, 8, seed=3, **kw) == D.random_lines(tok, 8, seed=3, **kw)
    assert D.random_lines(tok, 8, seed=3, **kw) != D.random_lines(tok, 8, seed=4, **kw)


def _sharegpt(tmp_path) -> Path:
    """A tiny ShareGPT file: two pairs that pass vLLM's filter, one of a prompt too short, one whose
    answer is too short, one of a single turn, one of three turns (its first two taken)."""
    def conv(*texts):
        return {"id": texts[0][:8], "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t}
                                                      for i, t in enumerate(texts)]}
    data = [conv("tell me about the cat and the dog in the park", "the cat sat on the mat while the dog ran"),
            conv("hi", "hello there, how are you doing today my friend"),
            conv("what did the dog do in the park today", "ok"),
            conv("a single turn that nobody answered at all"),
            conv("hello world, hello there in the park", "the quick brown fox jumps over the dog",
                 "and a third turn that is left out")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_takes_each_conversations_first_two_turns_filtered_by_length(tmp_path, bos_gguf):
    tok, _ = D.load_tokenizer(str(bos_gguf))
    path = _sharegpt(tmp_path)
    lines = D.sharegpt_lines(path, tok, 10, seed=0)
    by_prompt = {line["prompt"]: line["max_tokens"] for line in lines}
    assert by_prompt == {"tell me about the cat and the dog in the park":
                         len(tok.encode("the cat sat on the mat while the dog ran")),
                         "hello world, hello there in the park": len(tok.encode("the quick brown fox jumps over the dog"))}
    # --sharegpt-output-len: every max_tokens, and an answer too short is no longer a reason to leave one out
    fixed = D.sharegpt_lines(path, tok, 10, output_len=7, seed=0)
    assert sorted(line["prompt"] for line in fixed) == sorted([*by_prompt, "what did the dog do in the park today"])
    assert {line["max_tokens"] for line in fixed} == {7}
    jsonl = tmp_path / "sharegpt.jsonl"                                   # the records one a line: the same
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(path.read_text())))
    assert D.sharegpt_lines(jsonl, tok, 10, seed=0) == lines
    # shuffled by the seed: the same seed, the same order; the seeds, not one order
    assert D.sharegpt_lines(path, tok, 2, seed=9) == D.sharegpt_lines(path, tok, 2, seed=9)
    assert len({tuple(line["prompt"] for line in D.sharegpt_lines(path, tok, 2, seed=s)) for s in range(8)}) > 1
    assert len(D.sharegpt_lines(path, tok, 1, seed=0)) == 1                                  # --num of them


def _table(out: str) -> dict[str, str]:
    """The printed table's rows: name -> its one column's cell."""
    rows = {}
    for line in out.splitlines()[1:]:
        m = re.match(r"^(.*?)\s{2,}(\S+)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_a_saved_result_has_vllms_keys_and_the_values_the_table_prints(tmp_path, bos_gguf, capsys):
    pipeline = _pipeline_file(tmp_path, bos_gguf)
    out_dir = tmp_path / "out"
    code = agp(["bench", str(pipeline), "--dataset-name", "random", "--random-input-len", "24",
                "--random-output-len", "4", "--random-range-ratio", "0.5", "--num", "6", "--ignore-eos",
                "--no-progress", "--metric-percentiles", "50,95,99", "--save-result", "--save-detailed",
                "--result-dir", str(out_dir), "--result-filename", "r.json", "--metadata", "run=a", "note=b c"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"result: {out_dir / 'r.json'}" in captured.err
    saved = json.loads((out_dir / "r.json").read_text())
    assert VLLM_KEYS | DETAILED | {"p50_ttft_ms", "p95_e2el_ms", "run", "note", "agp"} <= set(saved)
    assert (saved["run"], saved["note"]) == ("a", "b c")
    assert (saved["backend"], saved["model_id"], saved["tokenizer_id"]) == ("agp", "bos.gguf", str(bos_gguf))
    assert (saved["num_prompts"], saved["request_rate"], saved["max_concurrency"]) == (6, "inf", None)
    assert re.fullmatch(r"\d{8}-\d{6}", saved["date"])
    row = _table(captured.out)
    assert row["requests ok/sent"] == f"{saved['completed']}/6" == "6/6" and saved["failed"] == 0
    assert row["duration (s)"] == f"{saved['duration']:.1f}"
    assert row["requests/s"] == f"{saved['request_throughput']:.2f}"
    assert row["output tok/s"] == f"{saved['output_throughput']:.1f}"
    assert row["total tok/s"] == f"{saved['total_token_throughput']:.1f}"
    for ours, theirs in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2el")):
        assert row[f"{ours} mean (ms)"] == f"{saved[f'mean_{theirs}_ms']:.1f}"
        assert row[f"{ours} p50 (ms)"] == f"{saved[f'median_{theirs}_ms']:.1f}" == f"{saved[f'p50_{theirs}_ms']:.1f}"
        for p in ("p95", "p99"):
            assert row[f"{ours} {p} (ms)"] == f"{saved[f'{p}_{theirs}_ms']:.1f}"
        assert saved[f"std_{theirs}_ms"] >= 0
    # the engine counted each prompt (its BOS too) within the asked range: what it was sent
    (lo, hi), (out_lo, out_hi) = _bounds(24, 4, 0.5, specials=1)
    assert len(saved["input_lens"]) == 6 and all(lo <= n <= hi for n in saved["input_lens"]), saved["input_lens"]
    assert sum(saved["input_lens"]) == saved["total_input_tokens"] == saved["agp"]["prompt_tokens"]
    assert all(out_lo <= n <= out_hi for n in saved["output_lens"])           # --ignore-eos: max_tokens each
    assert sum(saved["output_lens"]) == saved["total_output_tokens"]
    assert saved["errors"] == [""] * 6 and all(isinstance(t, str) and t for t in saved["generated_texts"])
    assert all(t > 0 for t in saved["ttfts"]) and len(saved["itls"]) == 6
    assert saved["agp"]["label"] == saved["label"] == "tiny" and saved["agp"]["units"]["ttft"] == "s"


def test_each_measurement_is_saved_in_its_own_file_and_without_save_detailed_no_lists(tmp_path, bos_gguf, capsys):
    pipeline = _pipeline_file(tmp_path, bos_gguf)
    code = agp(["bench", str(pipeline), "--dataset-name", "sharegpt", "--dataset-path", str(_sharegpt(tmp_path)),
                "--sharegpt-output-len", "3", "--num", "3", "--rate", "50,inf", "--no-progress", "--save-result",
                "--result-dir", str(tmp_path / "out"), "--seed", "2"])
    assert code == 0, capsys.readouterr().err
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 2
    saved = [json.loads(f.read_text()) for f in files]
    assert sorted(str(s["request_rate"]) for s in saved) == ["50.0", "inf"]
    for s, f in zip(saved, files):
        assert f.name.startswith(f"tiny-{float(s['request_rate'])}qps-bos.gguf-")
        assert not DETAILED & set(s) and VLLM_KEYS <= set(s)
        assert s["completed"] == 3 and s["total_output_tokens"] == 9    # --sharegpt-output-len 3 each


def test_a_server_measured_with_a_local_tokenizer_sees_the_drawn_lengths(tmp_path, bos_gguf, capsys):
    """--url: the prompts are drawn with --tokenizer, and the server's usage counts what was asked;
    the streamed text is the saved generated_texts."""
    server = LiveServer(bos_gguf)
    try:
        code = agp(["bench", "--url", server.url, "--dataset-name", "random", "--tokenizer", str(bos_gguf),
                    "--random-input-len", "20", "--random-output-len", "3", "--random-range-ratio", "0.2",
                    "--num", "4", "--no-progress", "--warmup", "0", "--save-detailed",
                    "--result-dir", str(tmp_path), "--result-filename", "sub/s.json"])
    finally:
        server.close()
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "sub" / "s.json").read_text())          # its folder made too
    (lo, hi), _ = _bounds(20, 3, 0.2, specials=1)
    assert all(lo <= n <= hi for n in saved["input_lens"]), saved["input_lens"]
    assert saved["backend"] == "openai" and saved["tokenizer_id"] == str(bos_gguf)
    assert all(isinstance(t, str) and t for t in saved["generated_texts"])


@pytest.mark.parametrize("argv, said", [
    (["--url", "U", "--dataset-name", "random"],
     "--dataset-name random counts tokens with a tokenizer, and --url's model is not here: give --tokenizer MODEL"),
    (["--url", "U", "--dataset-name", "random", "--tokenizer", "org/not-here-7b"],
     "the tokenizer 'org/not-here-7b' is not here"),
    (["--url", "U", "--dataset-name", "sharegpt", "--tokenizer", "{m}"], "--dataset-name sharegpt needs --dataset-path FILE"),
    (["--url", "U", "--dataset-name", "jsonl"], "--dataset-name jsonl needs its file: --dataset-path FILE"),
    (["--url", "U", "--dataset-name", "sharegpt", "--dataset-path", "{d}", "--tokenizer", "{m}"],
     "is a folder, not a ShareGPT JSON file"),
    (["--url", "U", "--dataset-name", "sharegpt", "--dataset-path", "{d}/bad.json", "--tokenizer", "{m}"],
     "bad.json is not JSON"),
    (["--url", "U", "--dataset-name", "sharegpt", "--dataset-path", "{w}", "--tokenizer", "{m}"],
     "w.jsonl holds no conversation of two turns"),
    (["--url", "U", "--dataset-name", "sharegpt", "--dataset-path", "{d}/one.json", "--tokenizer", "{m}"],
     "is not a ShareGPT file: it holds an object, not a JSON list"),
    (["--url", "U", "--random-input-len", "64", "-w", "{w}"],
     "--random-input-len shapes the random dataset's requests: add --dataset-name random (the requests are jsonl's"),
    (["--url", "U", "--sharegpt-output-len", "5", "--dataset-name", "random"],
     "--sharegpt-output-len sets the sharegpt dataset's max_tokens"),
    (["--url", "U", "--dataset-name", "random", "-w", "{w}"], "are two sources of requests: give one"),
    (["--url", "U", "--dataset-name", "random", "--dataset-path", "{w}"], "leave out --dataset-path"),
    (["--url", "U", "--dataset-name", "random", "--random-range-ratio", "1"],
     "argument --random-range-ratio: must be at least 0 and below 1, not 1"),
    (["--url", "U", "--dataset-name", "random", "--random-input-len", "0"], "argument --random-input-len"),
    (["--url", "U", "--dataset-name", "random", "--tokenizer", "{m}", "--random-input-len", "1",
      "--random-range-ratio", "0.5"], "can draw a prompt of no tokens"),
    (["--url", "U", "--dataset-name", "parquet"], "argument --dataset-name: invalid choice: 'parquet'"),
    (["--url", "U", "-w", "{w}", "--metadata", "oops"], "argument --metadata: 'oops' is not KEY=VALUE"),
    (["--url", "U", "-w", "{w}", "--metadata", "mean_ttft_ms=1"], "'mean_ttft_ms' is a key of the saved result"),
    (["--url", "U", "--url", "U", "-w", "{w}", "--result-filename", "r.json"],
     "--result-filename r.json names one file, and this run makes 2 measurements"),
    (["--url", "U", "-w", "{w}", "--result-dir", "{w}"], "w.jsonl is a file, not a folder"),
    (["--url", "U", "-w", "{w}", "--result-dir", "{d}", "--result-filename", "w.jsonl/r.json"],
     "--result-filename w.jsonl/r.json: {d}/w.jsonl is a file, not a folder"),
])
def test_bad_dataset_and_result_options_exit_2_saying_what_and_where(tmp_path, bos_gguf, capsys, argv, said):
    w = tmp_path / "w.jsonl"
    w.write_text(json.dumps({"prompt": "hello", "max_tokens": 2}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "one.json").write_text(json.dumps({"conversations": []}))
    (tmp_path / "bad.json").write_text('[{"conversations": [')
    argv = ["http://127.0.0.1:1" if a == "U" else a.format(w=w, d=tmp_path, m=bos_gguf) for a in argv]
    try:
        code = agp(["bench", "--no-progress", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert said.format(d=tmp_path) in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("*qps*.json"))
