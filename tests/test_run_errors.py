"""`agp run`'s error paths: a failed write stops the run at once with a clear message, the
summary and exit 1 (an output file deleted meanwhile too); the input is read line by line with a
length limit (a device such as /dev/zero is refused; an over-long line is an error record).
`--resume` and repeated ids: test_run_resume.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clikit import AGP, ROOT, agp, agp_child, agp_in, reaped, std_streams


PIPELINE = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode {{}}
    stage kv      : kv_lookup {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate {{ max_new_tokens = 4 }}
    stage out     : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


@pytest.fixture
def pipeline(tmp_path, tiny_gguf):
    path = tmp_path / "tiny.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf))
    return path


def run(pipeline, *args, child=False, **kw) -> subprocess.CompletedProcess:
    """`agp run PIPELINE ARGS` in this process, or in a child (`child=True`: an environment read at
    an import). A python stage's module is imported afresh in this process too: agp loads a module
    beside a pipeline by its path, and another folder's hooks.py is another module."""
    return (agp if child else agp_in)("run", pipeline, "--no-progress", "--threads", "1", *args, **kw)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_failed_write_stops_the_run_at_once_with_the_summary_and_exit_1(tmp_path, pipeline):
    inp, stats = tmp_path / "in.jsonl", tmp_path / "stats.json"
    inp.write_text("".join(json.dumps({"prompt": f"p{i}", "max_tokens": 8}) + "\n" for i in range(200)))
    r = run(pipeline, "-i", inp, "-o", "/dev/full", "--stats", stats)
    assert r.returncode == 1, r.stderr
    assert "cannot write /dev/full: No space left on device" in r.stderr and "run summary" in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    s = json.loads(stats.read_text())
    assert s["written"] == 0 and s["requests"] < 200                  # stopped, not run to the end
    # every line read is counted once: written, answered after the failure (lost), or interrupted;
    # the input is read as the run goes: the lines after those are not read
    assert s["written"] + s["unwritten"] == s["requests"] and s["requests"] + s["interrupted"] == s["lines_read"]
    assert s["lines_read"] == 200 or not s["input_ended"]


def test_a_write_cut_short_by_a_full_disk_leaves_the_output_whole_lines(tmp_path, pipeline):
    """The output's file system fills midway through a line (a file size limit stands in for a
    full disk): the file ended in a piece of a line, `{"id": 16,`; now it is cut back to the
    last whole line, and the run still stops with the summary and exit 1."""
    import resource

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "max_tokens": 4}) + "\n" for i in range(100)))
    limit = 1000                                      # bytes: a few answers, then a write cut midway

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(pipeline, "-i", inp, "-o", out, child=True, preexec_fn=small_files)
    assert r.returncode == 1 and f"cannot write {out}: File too large" in r.stderr, r.stderr
    data = out.read_bytes()
    assert 0 < len(data) < limit and data.endswith(b"\n")
    written = data.count(b"\n")
    assert [rec["id"] for rec in records(out)] == list(range(written))
    # the summary counts the answers written and those answered after the failed write apart
    requests = int(re.search(r"requests +(\d+) \(", r.stderr).group(1))
    after = re.search(r"; (\d+) answered after it, not written", r.stderr)
    assert f"{written} written before the output failed" in r.stderr, r.stderr
    assert requests == written + (int(after.group(1)) if after else 0), r.stderr


def test_a_full_disk_leaves_whole_lines_in_a_file_that_standard_error_writes_too(tmp_path, pipeline):
    """`agp run P -i in.jsonl > log 2>&1` on a file system that fills: the answer cut midway was
    taken back to a length counted from the answers alone, which the progress bar's lines (in the
    same file) made too short: the file ended in a piece of an answer. Now it is cut back to its
    length as that answer's write began."""
    import resource

    inp, log = tmp_path / "in.jsonl", tmp_path / "log"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "max_tokens": 4}) + "\n" for i in range(100)))
    limit = 3000                                      # bytes: a few answers, then a write cut midway

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(log, "wb") as both:
        r = subprocess.run([*AGP, "run", str(pipeline), "-i", str(inp), "--threads", "1"], stdout=both,
                           stderr=both, cwd=ROOT, preexec_fn=small_files, timeout=300)
    assert r.returncode == 1
    data = log.read_bytes()
    assert 0 < len(data) < limit and data.endswith(b"\n"), data[-200:]
    answers = [json.loads(line) for line in data.decode().splitlines() if line.startswith("{")]
    assert answers and [a["id"] for a in answers] == list(range(len(answers)))


WAIT_FOR_DELETE = """import os, time

def hold(item):
    # every request but the first two waits until the output file is gone (at most 120 s)
    if item["id"] not in ("q0", "q1"):
        deadline = time.monotonic() + 120
        while os.path.exists(os.environ["AGP_TEST_OUT"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return item
"""


def test_an_output_file_deleted_mid_run_stops_the_run_saying_the_answers_are_lost(tmp_path, pipeline, monkeypatch):
    # the answers went on into the deleted file, and the run ended "0 failed", exit 0, with nothing
    # anywhere; requests after the first two are held until the file is gone, however fast the run.
    # The run is this process's (agp_in): what it writes and how it ends is the point, not its
    # process; a thread deletes the file once the first two answers are in it
    (tmp_path / "waitdel.py").write_text(WAIT_FOR_DELETE)
    pipeline.write_text(pipeline.read_text()
                        .replace("request -> batch", "request -> hold -> batch")
                        .replace("stage out", 'stage hold    : python { fn = "waitdel:hold"  workers = 16 }\n'
                                              "    stage out"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "outdir" / "out.jsonl"
    out.parent.mkdir()
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(12)))
    monkeypatch.setenv("AGP_TEST_OUT", str(out))
    seen: list[int] = []

    def delete_after_two_answers():
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(out.read_text().count("\n") if out.exists() else 0)
        for f in out.parent.iterdir():                 # the answers and their fingerprint
            f.unlink()
        out.parent.rmdir()

    deleter = threading.Thread(target=delete_after_two_answers, daemon=True)
    deleter.start()
    r = run(pipeline, "-i", inp, "-o", out)
    deleter.join(120)
    assert seen and seen[0] >= 2, (seen, r.stderr)
    assert r.returncode == 1, r.stderr
    assert f"cannot write {out}: the file (or its folder) was deleted while the run wrote it" in r.stderr
    assert "run summary" in r.stderr and "Traceback" not in r.stderr


def test_input_lines_are_bounded_even_an_endless_one(tmp_path, pipeline):
    out = tmp_path / "zero.jsonl"
    r = run(pipeline, "-i", "/dev/zero", "-o", out)               # one line that never ends
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MemoryError" not in r.stderr
    (rec,) = records(out)
    assert rec["id"] == 1 and rec["error"]["message"].startswith("the line is longer than 16 MiB (no end of line")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "wb") as f:
        f.write(b'{"prompt": "' + b"a" * (17 << 20) + b'"}\n{"prompt": "ok"}\n{"id": 1, "prompt": "ok"}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    first, second, third = records(out)
    assert first == {"id": 1, "error": {"line": 1, "message": "the line is longer than 16 MiB", "type": "invalid",
                                        "status": 400}}
    assert second["id"] == 2 and "text" in second
    assert third["id"] == 1 and "text" in third          # the long line's number claims no id


def test_a_line_whose_model_names_nothing_served_is_an_error_record_as_agp_serve_answers_it(tmp_path, pipeline,
                                                                                             tiny_gguf):
    """`model` may name the pipeline, its model (the file's name or stem) or a generate stage, as
    on agp serve; anything else is that line's error record with agp serve's 404 message, and
    the other lines run."""
    from pipeline_dsl.serve.api_error import APIError
    from pipeline_dsl.serve.protocol import model_of

    model = Path(tiny_gguf)
    served = tuple(dict.fromkeys(("tiny", model.name, model.stem)))
    names = ["tiny", model.name, model.stem, "gen", "nope", "gne"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": "hi", "max_tokens": 2, "model": m}) + "\n" for m in names))
    stats = tmp_path / "stats.json"
    r = run(pipeline, "-i", inp, "-o", out, "--stats", stats)
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert (s["requests"], s["errors"], s["bad_lines"]) == (6, 2, 2)          # the refused lines are counted
    recs = records(out)
    assert all("text" in rec for rec in recs[:4]), recs[:4]
    for rec, name in zip(recs[4:], names[4:]):
        with pytest.raises(APIError) as served_answer:          # what agp serve answers it
            model_of({"model": name}, served, ("gen",))
        assert served_answer.value.status == 404
        assert rec["error"] == {"line": names.index(name) + 1, "message": served_answer.value.message,
                                "type": "invalid", "status": 404, "param": "model", "code": "model_not_found"}
    assert recs[5]["error"]["message"] == "the model 'gne' does not exist; did you mean 'gen'?"
    # agp run is no server: the list is what the pipeline answers to
    assert recs[4]["error"]["message"] == ("the model 'nope' does not exist; the pipeline answers to "
                                           + ", ".join(served + ("gen",)))


def test_a_bad_lines_error_record_carries_the_status_param_and_code_agp_serve_answers_it_with(tmp_path, pipeline):
    """A line agp serve would refuse with a 400 says so in its record, with the field at fault, as
    a failed request's record does (docs/language.md): a rerun tells it from a 500 worth retrying."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "regex", "prompt": "hi", "guided_regex": "(unclosed"},
             {"id": "choice", "prompt": "hi", "guided_choice": []},
             {"id": "tokens", "prompt": "hi", "max_tokens": -1},
             {"id": "fine", "prompt": "hi", "max_tokens": 2}]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    got = {r["id"]: r.get("error") for r in records(out)}
    assert got.pop("fine") is None
    assert {rid: (e["line"], e["type"], e["status"], e.get("param")) for rid, e in got.items()} == {
        "regex": (1, "invalid", 400, "guided_regex"), "choice": (2, "invalid", 400, "guided_choice"),
        "tokens": (3, "invalid", 400, "max_tokens"), 5: (5, "invalid", 400, None)}, got


def test_an_output_another_run_writes_is_refused_where_locks_need_the_file_open_for_writing(tmp_path, pipeline,
                                                                                            monkeypatch):
    """NFS and CIFS take flock as a whole-file lock that needs the file open for writing: one open
    read-only is refused (EBADF). The run locked an existing output through a read-only descriptor,
    took that refusal for a file system without locks and wrote the file another run was writing
    (exit 0); now it locks it open for writing and is refused, exit 2, the file untouched."""
    import errno
    import fcntl

    flock = fcntl.flock

    def nfs_flock(fd, operation):                   # Linux's NFS client: an exclusive lock needs write access
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "max_tokens": 2}) + "\n")
    out.write_text('{"id": "other", "text": "an answer of the run writing it"}\n')
    with open(out, "r+") as other_run:              # another agp run holds its output's lock
        flock(other_run.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for how in ("--overwrite", "--resume"):
            r = run(pipeline, "-i", inp, "-o", out, how)
            assert r.returncode == 2 and f"{out} is being written by another agp run" in r.stderr, r.stderr
    assert out.read_text() == '{"id": "other", "text": "an answer of the run writing it"}\n'


DECORATORS = """import functools

def logged(fn):                     # passes the call on (functools.wraps)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper

def bare(fn):                       # passes the call on, without functools.wraps
    def wrapper(*args):
        return fn(*args)
    return wrapper

def with_tag(fn):                   # supplies an argument itself
    @functools.wraps(fn)
    def wrapper(item):
        return fn(item, "tag")
    return wrapper

"""


def test_decorated_fns_that_take_the_call_run(tmp_path, tiny_gguf):
    """A decorator's wrapper: one that passes the call on to a def that takes it, with or without
    functools.wraps, one whose own signature takes the call and supplies the def's other
    argument, and a decorated method of an instance (its wrapped def takes self too: it was refused
    at load). Each loads and runs."""
    (tmp_path / "hooks.py").write_text(DECORATORS + "@logged\ndef a(item):\n    return item\n\n"
                                       "@bare\ndef b(item):\n    return item\n\n"
                                       "@with_tag\ndef c(item, tag):\n    item['metadata'] = {'tag': tag}\n"
                                       "    return item\n\n"
                                       "class Hooks:\n    @logged\n    def d(self, item):\n        return item\n\n"
                                       "d = Hooks().d\n")
    path = tmp_path / "tiny.agp"
    stages = "".join(f'stage {s} : python {{ fn = "hooks:{s}" }}\n    ' for s in "abcd")
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("request -> batch", "request -> a -> b -> c -> d -> batch")
                    .replace("stage out", stages + "stage out"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    r = run(path, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    (rec,) = records(out)
    assert "text" in rec, rec


@pytest.mark.parametrize("module, why", [
    ("NOT_FN = len('ab')\n", "'NOT_FN' in module 'hooks' is not callable (of type int)"),
    ("import os\nNOT_FN = getattr(os, 'sep')\n", "'NOT_FN' in module 'hooks' is not callable (of type str)"),
    ("raise ValueError('no config')\nNOT_FN = len('a')\n",
     "importing its module failed at {hooks}:1: ValueError: no config"),
    ("import os\n\nraise SystemExit\nNOT_FN = len('a')\n", "importing its module failed at {hooks}:3: SystemExit"),
    ("NOT_FN = (lambda: lambda item, chunks: item)()\n",             # a function a factory made
     "it is called as fn(item), but its signature (item, chunks) cannot take that: missing a required argument: "
     "'chunks'"),
    # a decorator's (*args, **kwargs) wrapper passes the call on: the def it wraps (functools.wraps)
    # is judged; it passed, and every request failed
    (DECORATORS + "@logged\ndef NOT_FN(item, extra):\n    return item\n",
     "it is called as fn(item), but its signature (item, extra) cannot take that: missing a required argument: "
     "'extra'"),
])
def test_a_fn_that_turns_out_not_callable_as_called_at_load_is_an_error_at_the_setting(tmp_path, tiny_gguf, module, why):
    """check reads source and passes these (a value it cannot see, a module failing on import);
    run then says which stage and where, exit 2, not an internal error."""
    (tmp_path / "hooks.py").write_text(module)
    path = tmp_path / "tiny.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("gen -> out", "gen -> p -> out").replace(
        "stage out", 'stage p : python { fn = "hooks:NOT_FN" }\n    stage out'))
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    r = run(path, "-i", inp, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2, r.stderr
    why = why.format(hooks=tmp_path / "hooks.py")
    assert f'{path}:10:29: error: stage \'p\': cannot load fn "hooks:NOT_FN": {why}' in r.stderr
    assert "internal error" not in r.stderr


@pytest.mark.parametrize("where, old, new, at", [
    ("the pipeline's", "device = cpu", "device = cuda", "3:14"),
    ("the generate stage's", "max_new_tokens = 4", 'max_new_tokens = 4  device = "cuda"', "9:61"),
])
def test_device_cuda_without_cuda_is_an_error_at_the_device_setting(tmp_path, tiny_gguf, where, old, new, at,
                                                                   monkeypatch):
    """check does not probe the hardware, so run finds a missing CUDA device: it says so at
    the setting that asked for it (the generate stage's own, else the pipeline's), exit 2. In
    this process, with torch saying no CUDA device is available (as CUDA_VISIBLE_DEVICES="" makes
    it say in a fresh process; a child took seconds to start)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "tiny.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace(old, new, 1))
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    r = run(path, "-i", inp, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2, r.stderr
    assert (f"{path}:{at}: error: device 'cuda' asked for, but no CUDA device is available; "
            "use device = cpu") in r.stderr
    assert "internal error" not in r.stderr


def _refuses_a_terabyte() -> bool:
    """Whether this machine refuses a 512 GiB allocation at once (a KV pool of 1024GiB is two),
    rather than overcommitting it: the kernel's heuristic does, unless RAM and swap hold it."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            mode = f.read().strip()
        with open("/proc/meminfo") as f:
            kib = sum(int(ln.split()[1]) for ln in f if ln.startswith(("MemTotal:", "SwapTotal:")))
    except OSError:
        return False
    return mode != "1" and kib < 256 << 20


@pytest.mark.skipif(not _refuses_a_terabyte(), reason="this machine would overcommit a 1024GiB KV pool")
@pytest.mark.parametrize("old, new, at", [
    ("budget = 1MiB", "budget = 1024GiB", "8:58"),                                  # the stage's own budget
    ("budget = 1MiB", "", "5:17"),                                                  # the pipeline's kv_budget
])
def test_a_kv_pool_past_the_machines_memory_is_an_error_at_its_budget(tmp_path, tiny_gguf, old, new, at):
    """check does not probe the memory, so run finds a KV pool that cannot be allocated: it says so
    at the setting that asked for it (the kv_lookup stage's budget, else the pipeline's kv_budget),
    exit 2, not an internal error."""
    path = tmp_path / "tiny.agp"
    text = PIPELINE.format(model=tiny_gguf).replace(old, new, 1)
    if not new:
        text = text.replace("dtype  = fp32\n", "dtype  = fp32\n    kv_budget = 1024GiB\n")
    path.write_text(text)
    assert agp_in("check", path).returncode == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    r = run(path, "-i", inp, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2, r.stderr
    assert f"{path}:{at}: error: the KV pool of 1024GiB (" in r.stderr
    assert "cannot be allocated on cpu" in r.stderr and "internal error" not in r.stderr


def test_a_prompt_over_max_prompt_tokens_is_an_error_record_of_the_requests_stage(tmp_path, tiny_gguf):
    """The limit is the request source's setting: its record names that stage, whether the
    prompt is refused on its length in characters or once tokenised."""
    path = tmp_path / "tiny.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("stage request : requests {}",
                                                             "stage request : requests { max_prompt_tokens = 10 }"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "word " * 50}) + "\n\n" +                 # a blank line: no record
                   json.dumps({"prompt": " ".join("abcdefghijklmnopqrst")}) + "\n" +
                   json.dumps({"prompt": "hi", "max_tokens": 1}) + "\n")
    r = run(path, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    long_chars, long_tokens, fine = records(out)
    assert long_chars["error"]["stage"] == long_tokens["error"]["stage"] == "request"
    assert (long_chars["error"]["line"], long_tokens["error"]["line"]) == (1, 3)     # the input's line numbers
    assert "(requests.max_prompt_tokens = 10)" in long_chars["error"]["message"]
    assert long_tokens["error"]["message"].endswith("tokens is longer than this pipeline accepts "
                                                    "(requests.max_prompt_tokens = 10)")
    assert "text" in fine


def test_a_thread_count_past_the_bound_is_an_error_not_a_crash(pipeline, tmp_path):
    """torch starts every asked thread at once: --threads 100000 ended the process with a
    segmentation fault (exit 139) after an internal error."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    r = agp_in("run", pipeline, "--no-progress", "--threads", "100000", "-i", tmp_path / "in.jsonl")
    assert r.returncode == 2, r.stderr
    assert "threads must be between 1 and 1024" in r.stderr and "100000" in r.stderr
    assert r.stdout == ""


def test_answers_on_stdout_are_utf8_whatever_the_locale(pipeline, tmp_path):
    """JSONL is UTF-8, as -o FILE writes it; under an ASCII locale (LC_ALL=C without Python's UTF-8
    mode) a non-ASCII id on stdout was an internal UnicodeEncodeError that lost the run."""
    (tmp_path / "in.jsonl").write_text('{"id": "ü✓", "prompt": "héllo"}\n', encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    r = subprocess.run([*AGP, "run", str(pipeline), "--no-progress", "--threads", "1", "-i",
                        str(tmp_path / "in.jsonl")], capture_output=True, cwd=ROOT, timeout=300, env=env)   # bytes
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    assert json.loads(r.stdout.decode("utf-8"))["id"] == "ü✓"


def test_a_run_whose_every_request_failed_says_so_and_exits_1(tmp_path, pipeline):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a", "max_tokens": -1}\n{"prompt": "b", "temprature": 0.3}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 1, r.stderr
    assert "every request failed (2 of 2" in r.stderr and "Traceback" not in r.stderr
    assert [sorted(rec) for rec in records(out)] == [["error", "id"], ["error", "id"]]


def test_an_input_with_nothing_to_run_loads_no_model_but_still_checks_the_pipeline(tmp_path, pipeline):
    """An empty input (or one every line of which --resume finds answered) is no reason to load a
    model: exit 0 at once, saying so; a broken pipeline is still exit 2."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n  \n")
    r = run(pipeline, "-i", inp, "-o", out)
    assert (r.returncode, out.read_text()) == (0, "")
    assert f"nothing to run: {inp} has no requests" in r.stderr and "load" not in r.stderr
    inp.write_text('{"id": "a", "prompt": "hi"}\n')
    assert run(pipeline, "-i", inp, "-o", out, "--overwrite").returncode == 0
    answered = out.read_text()
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0 and f"{out} answers every line of {inp} already" in r.stderr
    assert out.read_text() == answered
    broken = tmp_path / "broken.agp"
    broken.write_text(pipeline.read_text().replace("encode -> kv", "encode -> kvv"))
    inp.write_text("")
    r = run(broken, "-i", inp, "-o", out, "--overwrite")
    assert r.returncode == 2 and "kvv" in r.stderr


def test_a_progress_bar_whose_stream_breaks_goes_silent_and_never_blocks_the_run(monkeypatch):
    """`agp run … 2>&1 | head`: once the reader is gone a bar update raised inside tqdm, which left
    tqdm's lock held, and the next update (another engine callback, tqdm's monitor) waited for
    it forever: the run hung. The bar's stream now turns silent at the first failed write."""
    import threading

    from pipeline_dsl.commands.progress import progress_bar

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", Gone())
    bar = progress_bar(100, mininterval=0)

    def updates():
        for _ in range(50):
            bar.update(1)
            bar.set_postfix_str("x tok/s")

    threads = [threading.Thread(target=updates, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and bar.n == 100
    bar.close()


def test_a_progress_bar_off_a_terminal_writes_whole_lines_not_carriage_return_redraws(monkeypatch):
    """`agp run` as a container's job: its standard error is a log read line by line, and the bar
    wrote its redraws separated by carriage returns only, one line growing for the whole run (a
    collector keeps it as one record, or cuts it at its size limit). Off a terminal each redraw
    is a line of its own, at most every LOG_INTERVAL seconds, and the last says the count; on a
    terminal the bar is still redrawn in place."""
    import io

    from pipeline_dsl.commands import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress.progress_bar(5, mininterval=0)
        for _ in range(5):
            bar.update(1)
            bar.set_postfix_str("9 tok/s")
        bar.close()
        text = stream.getvalue()
        if isinstance(stream, Terminal):
            assert "\r" in text
            continue
        lines = text.splitlines()
        assert "\r" not in text and text.endswith("\n") and len(lines) == len(set(lines)) >= 2
        assert lines[0].startswith("  0%") and "5/5" in lines[-1] and "9 tok/s" in lines[-1]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress.progress_bar(1)
    bar.close()
    assert bar.mininterval == progress.LOG_INTERVAL                          # off a terminal: seldom
    # agp bench's bar, not left on a terminal (the table follows): in a log its last line said
    # '0/3', as if the load had stalled, and never the count it reached
    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress.progress_bar(3, leave=False)
        bar.update(3)
        bar.close()
        if not isinstance(stream, Terminal):
            assert "3/3" in stream.getvalue().splitlines()[-1]


def test_answers_on_a_pipe_whose_reader_has_gone_stop_the_run_with_exit_141_and_no_traceback(tmp_path, pipeline):
    """`agp run … | head -0`: the first answer cannot be written; the run stops there, says so
    (no error: the reader took what it wanted) and writes its summary (stderr), and nothing at
    exit complains of the closed pipe. It exits 141, 128 + SIGPIPE, as `yes | head -1`'s yes
    does (it exited 1, an error, where `set -o pipefail` scripts test for 141)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "hello", "max_tokens": 2}) + "\n" for i in range(20)))
    with reaped(agp_child("run", pipeline, "-i", inp, "--no-progress", "--threads", "1",
                          stdout=subprocess.PIPE)) as proc:
        proc.stdout.close()                              # the reader is gone before the first answer
        err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 141, err
    assert "agp run: standard output: the reader closed the pipe (Broken pipe): stopped after 0 answer(s)" in err
    assert "run summary" in err and "error" not in err.lower()
    assert "Traceback" not in err and "Exception ignored" not in err


def test_a_run_whose_messages_go_to_a_pipe_whose_reader_has_gone_exits_141(tmp_path, pipeline):
    """`agp run … 2>&1 | head -0`: its first message cannot be written either, and the run stops
    there. It exited 0, as if every line had been answered (none was); now 141, as a closed pipe
    for the answers alone does."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "hello", "max_tokens": 2}) + "\n" for i in range(20)))
    from pipeline_dsl import cli

    read_end, write_end = os.pipe()
    os.close(read_end)                                   # the reader is gone before the first message
    try:
        # answers and messages on the pipe: a process, whose exit flushes what is buffered for it
        proc = subprocess.run([*AGP, "run", str(pipeline), "-i", str(inp), "-o", "-", "--threads", "1"],
                              stdout=write_end, stderr=write_end, cwd=ROOT, timeout=300)
        assert proc.returncode == 141, ("-", proc.returncode)
        # the messages alone (answers to a file): the run's status, in this process
        both = open(write_end, "w", encoding="utf-8", closefd=False)
        with std_streams(stdout=both, stderr=both):
            code = cli.main(["run", str(pipeline), "-i", str(inp), "-o", str(out), "--threads", "1"])
        assert code == 141, (str(out), code)
        try:
            both.close()
        except BrokenPipeError:                          # what it could not write is still buffered
            pass
    finally:
        os.close(write_end)


def test_agp_run_in_process_writes_its_answers_to_a_stdout_with_no_file_behind_it(tmp_path, pipeline, monkeypatch):
    """cli.main from Python with sys.stdout a StringIO (a notebook, a test's capture): the answers
    go to it and it stays open. It failed ('NoneType' has no attribute 'lower': a StringIO has no
    encoding), and once that passed the run closed the caller's stream."""
    import io

    from pipeline_dsl import cli

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "max_tokens": 2}) + "\n")
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    assert cli.main(["run", str(pipeline), "-i", str(inp), "--no-progress", "--threads", "1"]) == 0
    assert not buf.closed and [json.loads(line)["id"] for line in buf.getvalue().splitlines()] == ["a"]


def test_a_missing_pipeline_with_an_output_file_is_check_s_error_not_a_write_error(tmp_path):
    """The output's fingerprint reads the pipeline file: one that is not there is reported as
    check reports it, exit 2, not as a failure to write the output."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    r = run(tmp_path / "nope.agp", "-i", inp, "-o", out)
    assert r.returncode == 2 and "file not found" in r.stderr and "cannot write" not in r.stderr, r.stderr


def test_a_gzip_compressed_input_is_read_decompressed_and_a_cut_one_is_a_clear_error(tmp_path, pipeline):
    import gzip

    lines = b'{"id": "a", "prompt": "x", "max_tokens": 1}\n{"id": "b", "prompt": "y", "max_tokens": 1}\n'
    packed = gzip.compress(lines)
    inp = tmp_path / "in.jsonl.gz"
    inp.write_bytes(packed)
    r = run(pipeline, "-i", inp)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == ["a", "b"]
    r = run(pipeline, "-i", "-", input=packed.decode("latin-1"), encoding="latin-1")      # on stdin too
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == ["a", "b"]
    inp.write_bytes(packed[:len(packed) // 2])
    r = run(pipeline, "-i", inp)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cannot read {inp}: it is gzip-compressed and cannot be decompressed" in r.stderr


def test_a_bom_crlf_endings_and_blank_lines_are_read_as_a_plain_files(tmp_path, pipeline):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "x", "max_tokens": 1}\r\n\r\n   \r\n'
                    b'{"id": "b", "prmpt": "y"}\r\n{"prompt": "z", "max_tokens": 1}')     # no end of line last
    r = run(pipeline, "-i", inp)
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert [g["id"] for g in got] == ["a", "b", 5] and "text" in got[0] and "text" in got[2]
    assert got[1]["error"]["line"] == 4


def test_a_run_whose_writes_would_replace_its_input_or_one_another_is_refused_before_it_starts(tmp_path, pipeline,
                                                                                             capsys):
    """`agp run P -o a.jsonl --overwrite < a.jsonl` emptied the input it was reading, answered the
    lines it had read ahead and exited 0; `--stats a.jsonl` wrote the summary over the requests
    (or over the answers, given the output's name); `-i a.jsonl >> a.jsonl` fed it its own answers.
    The redirections are this process's sys.stdin and sys.stdout opened on a.jsonl, as a shell
    opens them (the run looks at the file behind each stream); a child took seconds to start."""
    from pipeline_dsl import cli

    def main_with(stream, name, args):
        with std_streams(**{name: stream}):
            code = cli.main(["run", str(pipeline), "--no-progress", "--threads", "1", *map(str, args)])
        return code, capsys.readouterr().err

    inp, out = tmp_path / "a.jsonl", tmp_path / "out.jsonl"
    text = "".join(json.dumps({"prompt": f"p{i}", "max_tokens": 1}) + "\n" for i in range(3))
    inp.write_text(text)
    with open(inp) as stdin:
        code, err = main_with(stdin, "stdin", ("-o", inp, "--overwrite"))
    assert code == 2 and f"the output {inp} is the input file (standard input)" in err, err
    for args, said in ((("-i", inp, "-o", out, "--stats", inp), f"the --stats file {inp} is the input file"),
                       (("-i", inp, "-o", out, "--trace", out), f"the --trace file {out} is the output file"),
                       (("-i", inp, "-o", pipeline, "--overwrite"), f"the output {pipeline} is the pipeline file")):
        r = run(pipeline, *args)
        assert r.returncode == 2 and said in r.stderr, r.stderr
    with open(inp, "a") as stdout:
        code, err = main_with(stdout, "stdout", ("-i", inp))
    assert code == 2 and "standard output is the input file" in err, err
    assert inp.read_text() == text and not out.exists()
    r = run(pipeline, "-i", inp, "-o", "/dev/null", "--stats", "/dev/null")      # no file to replace
    assert r.returncode == 0, r.stderr


GATE = """
import pipeline_dsl

def gate(item):
    tier = item["headers"].get("x-tier")
    if tier == "over":
        raise pipeline_dsl.Reject("over the tenant's rate limit", status=429, retry_after=2.5)
    if tier == "plain":
        raise pipeline_dsl.Reject("refused")
    if tier == "field":
        raise pipeline_dsl.Reject("unknown tier", param="headers.x-tier", code="unknown_tier")
    if tier == "crash":
        raise RuntimeError("the tier table is gone")
    return item
"""


def test_a_rejects_status_retry_after_param_and_code_are_in_its_error_record(tmp_path, tiny_gguf):
    # a rate limiter's 429 is told apart from a plain refusal (400) in agp run's output, as agp
    # serve answers them
    (tmp_path / "run_gate_hooks.py").write_text(GATE, encoding="utf-8")
    path = tmp_path / "gated.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace(
        "request -> batch", 'stage gate : python { fn = "run_gate_hooks:gate" }\n    request -> gate -> batch'))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": tier, "prompt": "hi", "headers": {"x-tier": tier}}) + "\n"
                           for tier in ("over", "plain", "field", "fine", "crash")))
    inp.write_text(inp.read_text() + json.dumps({"id": "long", "prompt": "hi " * 2000}) + "\n")
    assert run(path, "-i", inp, "-o", out).returncode == 0
    got = {r["id"]: r.get("error") for r in records(out)}
    # any error's line says the status agp serve answers it with: a failure's 500 (worth a rerun)
    # apart from a prompt too long for the context (a 400 that fails again)
    crash, long = got.pop("crash"), got.pop("long")
    assert {k: crash[k] for k in ("type", "stage", "status", "code")} == {
        "type": "failed", "stage": "gate", "status": 500, "code": "stage_failed"} and "param" not in crash, crash
    assert {k: long[k] for k in ("type", "status", "param", "code")} == {
        "type": "invalid", "status": 400, "param": "prompt", "code": "context_length_exceeded"}, long
    # the status, param and code agp serve answers (param: the field the Reject names, else null)
    assert got == {"over": {"line": 1, "message": "over the tenant's rate limit", "type": "rejected",
                            "stage": "gate", "status": 429, "retry_after": 2.5, "param": None, "code": "rejected"},
                   "plain": {"line": 2, "message": "refused", "type": "rejected", "stage": "gate", "status": 400,
                             "param": None, "code": "rejected"},
                   "field": {"line": 3, "message": "unknown tier", "type": "rejected", "stage": "gate",
                             "status": 400, "param": "headers.x-tier", "code": "unknown_tier"},
                   "fine": None}
