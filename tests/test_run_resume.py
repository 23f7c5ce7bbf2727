"""`agp run --resume`: an output is held to the input and pipeline it was made from (a repeated
id, a cut last line, error records, lines appended to the input) and answers every line exactly
once; an output that is not this input's answers is refused before the model loads."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from clikit import ROOT, agp_child, ctrl_c_default, reaped
from test_run_errors import pipeline, records, run  # noqa: F401  (pipeline: a fixture)


def test_a_repeated_id_is_an_error_record_and_resume_answers_every_line_once(tmp_path, pipeline):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"id": 2, "prompt": "c"}\n{"id": "x", "prompt": "d"}\n'
                   '{"id": "x", "prompt": "e"}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["id"] for g in got] == [1, 2, 2, "x", "x"]
    assert "text" in got[1] and "also the id of line 2" in got[2]["error"]["message"]
    assert "text" in got[3] and "also the id of line 4" in got[4]["error"]["message"]
    # cut after the second record (as a kill would): --resume answers lines 3-5 again, none skipped
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:2]))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [g["id"] for g in records(out)] == [1, 2, 2, "x", "x"] and "error" in records(out)[2]


def test_a_broken_line_does_not_take_the_id_of_a_later_line(tmp_path, pipeline):
    """Ids 0, 1, 2 on lines 1, 2, 3 and line 2 broken: its error record takes its line number, 2,
    as id, and the good line 3 (id 2) was refused as a repeated id: one bad line lost two."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 0, "prompt": "a", "max_tokens": 1}\n{"id": 1, "prompt": "b\n'
                   '{"id": 2, "prompt": "c", "max_tokens": 1}\n{"prompt": 5}\n{"id": 4, "prompt": "d", "max_tokens": 1}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["id"] for g in got] == [0, 2, 2, 4, 4]
    assert [g["error"]["line"] if "error" in g else None for g in got] == [None, 2, None, 4, None]
    assert ["text" in g for g in got] == [True, False, True, False, True]
    # cut after the broken line's record: --resume runs lines 3-5 again, each once
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:2]))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert records(out) == got


@pytest.mark.parametrize("kept, foreign, first", [
    ('{"id": 1, "text": "a"}\nnot json at all\n', 1, 2),                              # a line of garbage
    ('{"id": "other-1", "text": "x"}\n{"id": "other-2", "error": {"line": 2}}\n', 2, 1),  # another input's answers
    ('{"id": 1, "text": "a"}\n{"id": 1, "text": "a"}\n{"id": 1, "text": "a"}\n', 1, 3),  # more records than lines
    ('{"id": 3}\n', 1, 1),                                                            # an object, not a record
])
def test_resume_refuses_an_output_that_is_not_this_inputs_answers(tmp_path, pipeline, kept, foreign, first):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a"}\n{"id": 1, "prompt": "b"}\n{"prompt": "c"}\n')   # ids 1, 1 (an error), 3
    out.write_text(kept)
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 2, r.stderr
    lines = "line is" if foreign == 1 else "lines are"
    assert f"is not the output of {inp}: {foreign} {lines} no answer to its lines (the first: line {first})" in r.stderr
    assert "--overwrite to start afresh" in r.stderr and "run summary" not in r.stderr   # before the model loads
    assert out.read_text() == kept


def test_a_refused_resume_loads_no_torch(tmp_path, pipeline):
    """The output is held to the input before the engine's libraries load: the refusal comes at
    once (it waited for torch to import, seconds on a busy machine)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "a"}\n')
    out.write_text("not json at all\n")
    code = ("import sys; from pipeline_dsl.cli import main; rc = main(sys.argv[1:]);"
            "assert 'torch' not in sys.modules, 'agp run imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "run", str(pipeline), "-i", str(inp), "-o", str(out), "--resume"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and f"is not the output of {inp}" in r.stderr, r.stderr


def test_resume_keeps_error_records_and_drops_a_cut_last_line(tmp_path, pipeline):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\nnot json\n{"id": "b", "prmpt": "y"}\n{"id": "c", "prompt": "z"}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    first = records(out)
    assert [g["id"] for g in first] == ["a", 2, "b", "c"] and "error" in first[1] and "error" in first[2]
    out.write_text(out.read_text()[:-5])                # a kill while the last record was written
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "dropping an incomplete last line" in r.stderr
    assert [g["id"] for g in records(out)] == ["a", 2, "b", "c"] and records(out)[:3] == first[:3]


@pytest.mark.parametrize("change", ["input", "pipeline", "generation_config", "reasoning_parser"])
def test_resume_refuses_an_output_made_from_a_changed_input_or_pipeline(tmp_path, pipeline, change):
    """The same ids are no proof of the same requests: a prompt or the pipeline changed since the
    output was begun makes --resume exit 2 before the model loads, the output left as it is."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    kept = out.read_text().splitlines()[0] + "\n"
    out.write_text(kept)                                  # as a kill after the first answer leaves it
    same = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert same.returncode == 0, same.stderr
    assert [g["id"] for g in records(out)] == ["a", "b"]
    out.write_text(kept)
    flags = []
    if change == "input":
        inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "another prompt"}\n')
    elif change == "pipeline":
        pipeline.write_text(pipeline.read_text().replace("max_new_tokens = 4", "max_new_tokens = 3"))
    elif change == "generation_config":                   # the model's sampling defaults left out
        flags = ["--generation-config", "vllm"]
    else:                                                 # chat lines' thinking split out of their text
        flags = ["--reasoning-parser", "qwen3"]
    r = run(pipeline, "-i", inp, "-o", out, "--resume", *flags)
    assert r.returncode == 2, r.stderr
    said = "input" if change == "input" else "pipeline"
    assert f"{out} was made from another {said} than this run's" in r.stderr and "--overwrite" in r.stderr
    assert "run summary" not in r.stderr and out.read_text() == kept
    r = run(pipeline, "-i", inp, "-o", out, "--overwrite", *flags)  # starting afresh takes the new one
    assert r.returncode == 0, r.stderr
    assert run(pipeline, "-i", inp, "-o", out, "--resume", *flags).returncode == 0
    out.write_text("")                    # killed before its first answer: nothing to mix, the next run's
    inp.write_text('{"id": "a", "prompt": "x"}\n')
    assert run(pipeline, "-i", inp, "-o", out, "--resume").returncode == 0
    out.write_text("")
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    r = run(pipeline, "-i", inp, "-o", out, "--resume")            # the empty output took this input
    assert r.returncode == 0, r.stderr
    out.write_text(out.read_text().splitlines()[0] + "\n")
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [g["id"] for g in records(out)] == ["a", "b"]


def test_resume_refuses_an_output_made_before_an_included_file_changed(tmp_path, pipeline):
    """The pipeline run may live in a file the named one includes (`use "tiny.agp"`): an edit
    there is another pipeline too (only the named file counted, and --resume mixed the answers
    of two pipelines in one output)."""
    main, inp, out = tmp_path / "main.agp", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    main.write_text('use "tiny.agp"\n')
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    assert run(main, "-i", inp, "-o", out).returncode == 0
    kept = out.read_text().splitlines()[0] + "\n"
    out.write_text(kept)
    pipeline.write_text(pipeline.read_text().replace("max_new_tokens = 4", "max_new_tokens = 3"))
    r = run(main, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 2, r.stderr
    assert f"{out} was made from another pipeline than this run's" in r.stderr and out.read_text() == kept


def _begun_with_a_schema(tmp_path, pipeline):
    """A run of two lines through a generate stage with json_schema "s.json": (the schema file, the
    input, the output, the output's first line, as a run cut after it leaves it)."""
    schema, inp, out = tmp_path / "s.json", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}')
    pipeline.write_text(pipeline.read_text().replace("max_new_tokens = 4", 'max_new_tokens = 4  json_schema = "s.json"'))
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    return schema, inp, out, out.read_text().splitlines()[0] + "\n"


def test_resume_refuses_an_output_made_before_its_json_schema_file_changed(tmp_path, pipeline):
    """Every answer of a generate stage with a json_schema follows that file: one edited since the
    output was begun (the .agp text the same) is another pipeline, as an edited include is; --resume
    appended answers of the new schema after those of the old one."""
    schema, inp, out, kept = _begun_with_a_schema(tmp_path, pipeline)
    out.write_text(kept)
    assert run(pipeline, "-i", inp, "-o", out, "--resume").returncode == 0     # the same schema: resumed
    out.write_text(kept)
    schema.write_text('{"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}')
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 2, r.stderr
    assert f"{out} was made from another pipeline than this run's" in r.stderr and out.read_text() == kept


def test_resume_takes_an_output_an_earlier_agp_began_before_json_schema_files_counted(tmp_path, pipeline):
    """An agp that did not yet fingerprint the json_schema files wrote `OUT.agp-run` without their
    digests: after an upgrade --resume of that output (the pipeline and its schema unchanged) was
    refused as made from another pipeline (exit 2); it goes on, as one written before the
    generation-config flags does. The same old fingerprint is still held to the rest of the pipeline."""
    schema, inp, out, kept = _begun_with_a_schema(tmp_path, pipeline)
    mark = tmp_path / "out.jsonl.agp-run"
    now = json.loads(mark.read_text())
    assert now["pipeline"][-1] == {"json_schema": {"gen": now["pipeline"][-1]["json_schema"]["gen"]}}
    # as the earlier agp wrote it: the first line's fingerprint, the pipeline without the schemas' digests
    old = {**now, "pipeline": now["pipeline"][:-1]}
    out.write_text(kept)
    mark.write_text(json.dumps(old))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [g["id"] for g in records(out)] == ["a", "b"]
    out.write_text(kept)                  # an old fingerprint of another pipeline is still refused
    mark.write_text(json.dumps({**old, "pipeline": ["0" * 64, *old["pipeline"][1:]]}))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 2 and f"{out} was made from another pipeline than this run's" in r.stderr


def test_a_run_to_a_file_loads_its_pipeline_once(tmp_path, pipeline, monkeypatch):
    """The fingerprint an output file is held to and the run come from one load of the pipeline
    and its includes (the fingerprint parsed them all again), a --resume too, and a run with
    nothing left to answer."""
    import pipeline_dsl.loader

    loads = []
    load_program = pipeline_dsl.loader.load_program
    monkeypatch.setattr(pipeline_dsl.loader, "load_program",
                        lambda *a, **kw: loads.append(a[0]) or load_program(*a, **kw))
    main, inp, out = tmp_path / "main.agp", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    main.write_text('use "tiny.agp"\n')
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    assert run(main, "-i", inp, "-o", out).returncode == 0 and len(loads) == 1, loads
    out.write_text(out.read_text().splitlines()[0] + "\n")
    r = run(main, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0 and len(loads) == 2 and [g["id"] for g in records(out)] == ["a", "b"], (r.stderr, loads)
    r = run(main, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0 and "nothing to run" in r.stderr and len(loads) == 3, (r.stderr, loads)


def test_resume_takes_an_input_with_lines_appended_and_runs_only_those(tmp_path, pipeline):
    """A batch file grown by lines added at its end is the same input, more of it: --resume answers
    the new lines alone; the grown file is then the one a later --resume holds the output to."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    before = out.read_text()
    inp.write_text(inp.read_text() + '{"id": "c", "prompt": "z"}\n')
    stats = tmp_path / "stats.json"
    r = run(pipeline, "-i", inp, "-o", out, "--resume", "--stats", stats)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith(before) and [g["id"] for g in records(out)] == ["a", "b", "c"]
    s = json.loads(stats.read_text())         # the lines read: those answered now and those kept
    assert (s["requests"], s["resumed_skipped"], s["interrupted"], s["lines_read"]) == (1, 2, 0, 3)
    inp.write_text(inp.read_text().replace('"y"', '"changed"') + '{"id": "d", "prompt": "w"}\n')
    r = run(pipeline, "-i", inp, "-o", out, "--resume")          # a line changed before those appended
    assert r.returncode == 2 and f"{out} was made from another input" in r.stderr



def test_resume_reads_a_blank_line_of_its_output_as_nothing_to_mix_up(tmp_path):
    """An output with a blank line between its records (one edited by hand) still holds this
    input's answers: the blank line is neither a record nor a foreign line; a last line cut
    short is not kept."""
    from pipeline_dsl.commands.run import answered_ids

    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "text": "a"}\n\n{"id": 2, "error": {"line": 2}}\n{"id": 3, "te')
    ids, keep, foreign = answered_ids(str(out))
    assert dict(ids) == {"1": 1, "2": 1} and foreign == []
    assert keep == len(b'{"id": 1, "text": "a"}\n\n{"id": 2, "error": {"line": 2}}\n')


def test_resume_lets_the_answered_ids_go_as_it_matches_them_to_the_input(tmp_path):
    """--resume over an output of 20000 answered lines: each record's id is let go once an input
    line matches it. It was kept, with a second count of the matched ones, beside each input id's
    first line (the duplicate-id check every run keeps): after reading the input the run held 3.2
    times what the output's ids take (264 bytes a line here; about 280 MB for a million lines), now
    2.2 times (181 bytes a line). Memory is measured with tracemalloc, never time. 5000 lines keep
    the ratio of 20000 (their id tables as full: 5000 in 8192 slots, as 20000 in 32768), in a
    quarter of the time; a one-line read first imports what reading imports, outside the count."""
    import tracemalloc

    from pipeline_dsl.commands.run import RunLines, answered_ids
    from pipeline_dsl.commands.run_input import InputLines, open_input

    def lines_of(n: int):
        out, inp = tmp_path / f"out{n}.jsonl", tmp_path / f"in{n}.jsonl"
        out.write_text("".join('{"id": "req-%07d", "text": "x"}\n' % i for i in range(n)))
        inp.write_text("".join('{"id": "req-%07d", "prompt": "x"}\n' % i for i in range(n)))
        return out, inp

    out, inp = lines_of(1)
    RunLines(InputLines(open_input(str(inp))), answered_ids(str(out))[0]).read_ahead(float("inf"))
    n = 5000
    out, inp = lines_of(n)
    tracemalloc.start()
    try:
        done = answered_ids(str(out))[0]
        ids = tracemalloc.get_traced_memory()[0]            # the output's ids
        lines = RunLines(InputLines(open_input(str(inp))), done)
        lines.read_ahead(float("inf"))
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert lines.skipped == n and not lines.held and not lines.unmatched
    assert kept < 2.7 * ids, (kept / n, ids / n)


HOLD = """import os, pathlib, time

def hold(item):
    # every request but q0 and q1 says it came, then waits for the test's "go" file (at most 120 s)
    if item["id"] not in ("q0", "q1"):
        folder = pathlib.Path(os.environ["AGP_TEST_DIR"])
        (folder / ("came-" + item["id"])).touch()
        deadline = time.monotonic() + 120
        while not (folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return item
"""


def test_lines_read_but_not_taken_at_ctrl_c_count_as_interrupted_and_resume_answers_exactly_them(
        tmp_path, pipeline, monkeypatch):
    """A --resume run reads the lines its output's fingerprint covers before it runs any: those it
    has not handed to the pipeline when Ctrl-C comes are interrupted, as those in flight are: the
    summary and --stats count them, no answer is written for them, and the next --resume answers
    exactly them. The queue holds one request (requests.max_queue = 1) and q2 is held in a python
    stage until the signal, so q3 waits for the queue and q4-q7 are read and never taken (q2, let go
    once the stop is set, is aborted or, finishing as the stop comes, answered)."""
    (tmp_path / "holdq.py").write_text(HOLD)
    pipeline.write_text(pipeline.read_text()
                        .replace("stage request : requests {}", "stage request : requests { max_queue = 1 }")
                        .replace("request -> batch", "request -> hold -> batch")
                        .replace("stage out", 'stage hold    : python { fn = "holdq:hold" }\n    stage out'))
    monkeypatch.setenv("AGP_TEST_DIR", str(tmp_path))
    ids = [f"q{i}" for i in range(8)]
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"hello {i}", "max_tokens": 2}) + "\n" for i in ids))
    (tmp_path / "go").touch()
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    # as a run interrupted with q2-q7 in flight leaves it: two answers, a fingerprint of the 8 lines
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:2]))
    for f in tmp_path.glob("came-*"):
        f.unlink()
    (tmp_path / "go").unlink()
    with reaped(agp_child("run", pipeline, "-i", inp, "-o", out, "--resume", "--stats", stats, "--no-progress",
                          "--threads", "1", preexec_fn=ctrl_c_default)) as proc:
        deadline = time.monotonic() + 120
        while not (tmp_path / "came-q2").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        said = []
        while not any("SIGINT: stopping" in line for line in said):    # the stop is set: q2 may go now
            said.append(proc.stderr.readline())
            assert said[-1], "".join(said)
        (tmp_path / "go").touch()
        err = "".join(said) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    s = json.loads(stats.read_text())
    kept = records(out)
    assert (s["lines_read"], s["resumed_skipped"]) == (8, 2), s
    # q3 was handed to the queue's feeder, q4-q7 never: none of them is answered, each is interrupted
    assert s["requests"] <= 1 and s["requests"] + s["interrupted"] + s["resumed_skipped"] == s["lines_read"], s
    assert f"{s['interrupted']} interrupted, not written" in err, err
    assert [g["id"] for g in kept] == ids[:2 + s["requests"]]
    r = run(pipeline, "-i", inp, "-o", out, "--resume", "--stats", stats)
    assert r.returncode == 0, r.stderr
    s2 = json.loads(stats.read_text())
    assert (s2["requests"], s2["resumed_skipped"], s2["interrupted"]) == (s["interrupted"], len(kept), 0), s2
    got = records(out)
    assert [g["id"] for g in got] == ids and all("text" in g for g in got)
