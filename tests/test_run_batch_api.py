"""`agp run` on the files batch users have: an OpenAI batch-API file is answered in the Batch
API's output shape (custom_id, response.status_code, response.body as agp serve answers it, error),
in input order and resumable; a CSV or a text file given by mistake is refused before the model
loads (exit 2), and so is an output that is the input file; the summary's token counts add up to
the output lines' usage."""
from __future__ import annotations

import json

import pytest

from test_run_errors import PIPELINE, pipeline, records, run  # noqa: F401  (pipeline: a fixture)


def batch_line(cid, url, body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"


CHAT, COMP, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def test_a_batch_api_file_is_answered_in_the_batch_output_shape_in_input_order(tmp_path, pipeline):
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("c1", CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                                           "max_completion_tokens": 3})
                   + batch_line("p1", COMP, {"model": "gpt-4o-mini", "prompt": "once", "max_tokens": 2,
                                             "logprobs": 1})
                   + batch_line("typo", CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokenz": 3})
                   + batch_line("emb", "/v1/embeddings", {"input": "x"})
                   + batch_line("c1", COMP, {"prompt": "again"})
                   + json.dumps({"prompt": "a plain line"}) + "\n")
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["custom_id"] for g in got] == ["c1", "p1", "typo", "emb", "c1", 6]
    chat, comp = got[0], got[1]
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert comp["response"]["body"]["object"] == "text_completion"
    # response.request_id names the answer as agp serve's X-Request-Id would: its body's id, by input line
    assert chat["response"]["request_id"] == body["id"] == "chatcmpl-1"
    assert comp["response"]["request_id"] == comp["response"]["body"]["id"] == "cmpl-2"
    # the configuration that answered, as agp serve names it: the same for every line of the run
    assert body["system_fingerprint"].startswith("fp_")
    assert comp["response"]["body"]["system_fingerprint"] == body["system_fingerprint"]
    assert len(comp["response"]["body"]["choices"][0]["logprobs"]["tokens"]) == 2
    typo, emb, dup, plain = got[2:]
    assert typo["response"]["status_code"] == 400 and "did you mean 'max_tokens'" in typo["error"]["message"]
    assert typo["response"]["body"]["error"]["param"] == "max_tokenz" and typo["error"]["line"] == 3
    assert emb["error"] is None and emb["response"]["body"]["object"] == "list"      # an embeddings line: below
    assert "also the custom_id of line 1" in dup["error"]["message"]
    assert "not a batch request line" in plain["error"]["message"]
    assert len({g["id"] for g in got}) == len(got)


def test_an_embeddings_line_is_answered_as_agp_serve_answers_its_body(tmp_path, pipeline, tiny_gguf):
    """OpenAI's Batch API and vLLM's run-batch take /v1/embeddings lines: each is answered with the
    body agp serve's /v1/embeddings gives (the same vectors, usage and fields), or the error record
    of what it refuses. They were error records ('url' must be /v1/chat/completions or /v1/completions).
    agp bench's workload refuses them: they generate nothing."""
    import base64
    import struct

    import pytest
    import torch

    from pipeline_dsl.commands.batch_api import workload_request
    from pipeline_dsl.requests_io import RequestError
    from test_serve import LiveServer

    bodies = [{"input": ["hello world", "the cat"]},
              {"input": [[5, 6, 7]], "encoding_format": "base64", "normalize": False},
              {"input": "hello world", "truncate_prompt_tokens": 1}]
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("named", EMB, {**bodies[0], "model": "text-embedding-3-small"})
                   + "".join(batch_line(f"e{i}", EMB, b) for i, b in enumerate(bodies[1:], 1))
                   + batch_line("dims", EMB, {"input": "x", "dimensions": 3}))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got = records(out)

    def floats(v):
        return torch.tensor(v if isinstance(v, list) else struct.unpack(f"<{len(base64.b64decode(v)) // 4}f",
                                                                         base64.b64decode(v)))

    server = LiveServer(tiny_gguf, text=PIPELINE.format(model=tiny_gguf))
    try:
        for line, body in zip(got, bodies):
            want = server.http.post(server.url + "/v1/embeddings", json=body, timeout=60).json()
            assert line["error"] is None and line["response"]["status_code"] == 200, line
            answer = line["response"]["body"]
            assert line["response"]["request_id"].startswith("embd-") and answer["usage"] == want["usage"]
            assert [d["index"] for d in answer["data"]] == [d["index"] for d in want["data"]]
            for d, w in zip(answer["data"], want["data"]):
                assert torch.allclose(floats(d["embedding"]), floats(w["embedding"]), atol=1e-5)
    finally:
        server.close()
    assert got[0]["response"]["body"]["model"] == "text-embedding-3-small"      # the file's own, echoed
    assert got[2]["response"]["body"]["usage"]["prompt_tokens"] == 1
    dims = got[3]
    assert dims["response"]["status_code"] == 400 and dims["response"]["body"]["error"]["param"] == "dimensions"
    with pytest.raises(RequestError, match="generates nothing"):
        workload_request(json.loads(batch_line("w", EMB, {"input": "x"})), 1)


def test_a_batch_lines_envelope_is_checked_field_by_field_and_method_defaults_to_post(tmp_path, pipeline):
    """A field beside `body` (max_tokens put next to it) is that line's error record naming where
    it belongs, not dropped in silence; a line without `method` is a POST; another method is refused."""
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    body = {"prompt": "once", "max_tokens": 2}
    inp.write_text(json.dumps({"custom_id": "beside", "method": "POST", "url": COMP, "body": body, "max_tokens": 5})
                   + "\n" + json.dumps({"custom_id": "no-method", "url": COMP, "body": body}) + "\n"
                   + json.dumps({"custom_id": "get", "method": "GET", "url": COMP, "body": body}) + "\n")
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    beside, no_method, get = records(out)
    assert beside["response"]["status_code"] == 400 and beside["error"]["line"] == 1
    assert "'max_tokens' belongs inside 'body'" in beside["error"]["message"]
    assert no_method["error"] is None and no_method["response"]["status_code"] == 200
    assert get["response"]["status_code"] == 400 and "'method' must be \"POST\"" in get["error"]["message"]


def test_a_batch_lines_envelope_error_names_its_field_as_a_body_fields_error_does(tmp_path, pipeline):
    """The error body of a line refused for custom_id, method, url, body, a field beside them, or
    a custom_id taken already names that field in `param`, as an error in the body names its own."""
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    body = {"prompt": "once", "max_tokens": 2}
    lines = [{"custom_id": "get", "method": "GET", "url": COMP, "body": body},
             {"custom_id": "where", "method": "POST", "url": "/v1/nowhere", "body": body},
             {"custom_id": "text", "method": "POST", "url": COMP, "body": "once"},
             {"custom_id": "beside", "method": "POST", "url": COMP, "body": body, "max_tokens": 5},
             {"custom_id": 7, "method": "POST", "url": COMP, "body": body},
             {"custom_id": "get", "method": "POST", "url": COMP, "body": body},
             {"custom_id": "typo", "method": "POST", "url": COMP, "body": {"prompt": "once", "max_tokenz": 2}},
             {"custom_id": "fine", "method": "POST", "url": COMP, "body": body}]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    *got, fine = records(out)
    assert [g["response"]["status_code"] for g in got] == [400] * 7 and fine["response"]["status_code"] == 200
    assert [g["response"]["body"]["error"]["param"] for g in got] == [
        "method", "url", "body", "max_tokens", "custom_id", "custom_id", "max_tokenz"]


def test_resume_of_a_batch_file_answers_each_custom_id_once(tmp_path, pipeline):
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(batch_line(f"r{i}", COMP, {"prompt": f"p{i}", "max_tokens": 2}) for i in range(4)))
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:2]) + whole[2][:25])          # killed while writing the third line
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [g["custom_id"] for g in records(out)] == ["r0", "r1", "r2", "r3"]


def test_a_csv_or_text_file_is_refused_before_the_model_loads(tmp_path, pipeline):
    for name, text, hint in (("in.csv", "id,prompt\n1,hello\n", "a CSV file?"),
                             ("in.txt", "hello there\nwhat is 2+2\n", "a text file of prompts?")):
        path = tmp_path / name
        path.write_text(text)
        r = run(pipeline, "-i", path, "-o", tmp_path / "out.jsonl", "--overwrite")
        assert r.returncode == 2, r.stderr
        assert f"{path} is not JSON Lines: none of its 2 lines is JSON (line 1:" in r.stderr and hint in r.stderr
        assert "run summary" not in r.stderr                     # nothing ran
    mixed = tmp_path / "mixed.jsonl"                             # one bad line among good ones: a record
    mixed.write_text('not json\n{"prompt": "x"}\n')
    r = run(pipeline, "-i", mixed, "-o", tmp_path / "m.jsonl")
    assert r.returncode == 0, r.stderr
    assert [("error" in g) for g in records(tmp_path / "m.jsonl")] == [True, False]


def test_a_pretty_printed_json_file_is_refused_before_the_model_loads_with_the_jq_that_flattens_it(tmp_path, pipeline):
    """json.dump(requests, indent=2) writes an array over several lines, some of whose elements
    would parse as lines of their own: such a file is refused as a whole (exit 2, nothing written),
    not run as the one element that fits a line among error records; so are objects written over
    several lines, with the jq that puts each on one line, not a text file's hint, and an array on
    one line (json.dump without an indent), before the model loads rather than as its record."""
    reqs = [{"prompt": "hi", "max_tokens": 2}, {"prompt": "yo", "max_tokens": 2}]
    for name, text, said, hint in (
            ("array.json", json.dumps(reqs, indent=2) + "\n", "line 1 is a lone '['", "jq -c '.[]' FILE"),
            ("rows.json", "[\n" + ",\n".join(map(json.dumps, reqs)) + "\n]\n", "line 1 is a lone '['", "jq -c"),
            ("line.json", json.dumps(reqs) + "\n", "line 1 is a JSON array", "jq -c '.[]' FILE"),
            ("objects.json", "\ufeff" + "".join(json.dumps(r, indent=2) + "\n" for r in reqs),
             "line 1 is a lone '{'", "jq -c . FILE")):
        path, out = tmp_path / name, tmp_path / f"{name}.out"
        path.write_text(text, encoding="utf-8")
        r = run(pipeline, "-i", path, "-o", out)
        assert r.returncode == 2, r.stderr
        assert f"{path} is not JSON Lines: {said}" in r.stderr and hint in r.stderr, r.stderr
        assert "a text file of prompts" not in r.stderr and "run summary" not in r.stderr   # nothing ran
        assert not out.exists() or out.read_text() == ""
    flat = tmp_path / "flat.jsonl"                      # the same requests one a line run
    flat.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    r = run(pipeline, "-i", flat, "-o", tmp_path / "flat.out")
    assert r.returncode == 0, r.stderr
    assert ["text" in g for g in records(tmp_path / "flat.out")] == [True, True]


def test_the_summarys_tokens_add_up_to_the_output_lines_usage(tmp_path, pipeline):
    """A prompt over the model's context fails after it is tokenised; its tokens are in no output
    line, so the summary does not count them either."""
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    inp.write_text(json.dumps({"prompt": "word " * 700}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    r = run(pipeline, "-i", inp, "-o", out, "--stats", stats)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert "error" in got[0] and "text" in got[1]
    s = json.loads(stats.read_text())
    assert s["prompt_tokens"] == got[1]["usage"]["prompt_tokens"]
    assert s["completion_tokens"] == got[1]["usage"]["completion_tokens"]


def test_an_output_that_is_the_input_file_is_refused_and_the_input_kept(tmp_path, pipeline):
    """`-i a.jsonl -o a.jsonl --overwrite` wrote the answers over the requests (and --resume's
    refusal of that file suggested --overwrite)."""
    inp = tmp_path / "a.jsonl"
    text = '{"prompt": "hi"}\n'
    inp.write_text(text)
    (tmp_path / "link.jsonl").symlink_to(inp)
    for out, how in ((inp, "--overwrite"), (inp, "--resume"), (tmp_path / "link.jsonl", "--overwrite")):
        r = run(pipeline, "-i", inp, "-o", out, how)
        assert r.returncode == 2 and f"the output {out} is the input file" in r.stderr, r.stderr
        assert inp.read_text() == text


def test_resume_without_an_output_file_is_refused(tmp_path, pipeline):
    """--resume with the answers on stdout was ignored: every line ran again, nothing said so."""
    inp = tmp_path / "a.jsonl"
    inp.write_text('{"prompt": "hi"}\n')
    r = run(pipeline, "-i", inp, "--resume")
    assert r.returncode == 2 and "--resume continues an output file" in r.stderr and r.stdout == ""


def test_the_fingerprint_cache_keeps_no_runtime_alive():
    """A finished run's runtime (its model, its KV pool) is freed: the fingerprint is cached
    weakly (an lru_cache held the last four runtimes of a process)."""
    import gc
    import weakref

    from pipeline_dsl.commands import batch_api

    class Runtime:                         # what system_fingerprint reads is not needed: patched
        pass

    import pipeline_dsl.serve.build as build
    real, build.system_fingerprint = build.system_fingerprint, lambda rt: f"fp_{id(rt)}"
    try:
        rt = Runtime()
        assert batch_api.fingerprint(rt) == batch_api.fingerprint(rt) == f"fp_{id(rt)}"
        gone = weakref.ref(rt)
        del rt
        gc.collect()
        assert gone() is None
    finally:
        build.system_fingerprint = real


def test_a_completions_line_with_several_prompts_is_answered_in_one_body_as_serve_answers_it(tmp_path, pipeline):
    """`"prompt": [a, b]` with n = 2: four choices numbered prompt * n + i, each prompt's answers
    its own (greedy: each prompt's alone), usage summed; it was refused ("one line a prompt")."""
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    lines = [batch_line("two", COMP, {"prompt": ["once upon", "the end"], "max_tokens": 3, "n": 2,
                                      "temperature": 0}),
             batch_line("a", COMP, {"prompt": "once upon", "max_tokens": 3, "temperature": 0}),
             batch_line("b", COMP, {"prompt": "the end", "max_tokens": 3, "temperature": 0}),
             batch_line("big", COMP, {"prompt": ["x"] * 256, "n": 64, "max_tokens": 1})]
    inp.write_text("".join(lines))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    two, a, b, big = records(out)
    body = two["response"]["body"]
    assert two["error"] is None and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    alone = [a["response"]["body"]["choices"][0]["text"], b["response"]["body"]["choices"][0]["text"]]
    assert [c["text"] for c in body["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    use = [x["response"]["body"]["usage"] for x in (a, b)]
    assert body["usage"]["prompt_tokens"] == use[0]["prompt_tokens"] + use[1]["prompt_tokens"]   # once a prompt
    assert body["usage"]["completion_tokens"] == 2 * (use[0]["completion_tokens"] + use[1]["completion_tokens"])
    assert big["response"]["status_code"] == 400 and "asks for 16384 answers" in big["error"]["message"]
    assert "1 answered" not in r.stderr and "requests        4 (1 failed)" in r.stderr


def test_the_first_request_line_says_the_inputs_shape_and_a_line_of_the_other_is_an_error_record(tmp_path, pipeline):
    """The input is read as a stream: its first JSON object line says whether it is a batch-API
    file; a batch line after agp request lines is an error record of its line, as a plain line
    in a batch file is."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("not json\n" + json.dumps({"id": "p", "prompt": "hi", "max_tokens": 1}) + "\n"
                   + batch_line("c1", CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    bad, plain, batch = records(out)
    assert bad["error"]["line"] == 1 and "text" in plain
    assert batch["id"] == "c1" and batch["error"]["line"] == 3
    assert "a batch request line (with a custom_id) while the input's first request (line 2)" in batch["error"]["message"]


def test_a_batch_line_is_numbered_by_the_stages_n_and_its_stream_fields_are_ignored(tmp_path, tiny_gguf):
    """A completions line of several prompts that gives no n, to a pipeline whose generate stage
    answers n = 2: choice i of prompt k is numbered k * 2 + i (each echoes its own prompt), as POST
    /v1/completions numbers them. A line's `stream` and `stream_options` are ignored (a batch
    answer is one body), so a field a stream refuses (prompt_logprobs above 0) is still taken."""
    from test_run_errors import PIPELINE

    path = tmp_path / "n2.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("generate { max_new_tokens = 4 }",
                                                             "generate { max_new_tokens = 3  n = 2 }"))
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    prompts = ["once upon", "the end"]
    inp.write_text(batch_line("two", COMP, {"prompt": prompts, "max_tokens": 2, "echo": True})
                   + batch_line("s", COMP, {"prompt": "hi", "max_tokens": 2, "stream": True, "prompt_logprobs": 1,
                                            "stream_options": {"include_usage": True}})
                   + batch_line("many", COMP, {"prompt": ["x"] * 129, "max_tokens": 1}))
    r = run(path, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    two, streamed, many = records(out)
    # the stage's n bounds a line's answers as a sent n does, as agp serve bounds a body's
    assert many["response"]["status_code"] == 400 and many["response"]["body"]["error"]["param"] == "prompt"
    assert "129 prompts x n = 2 asks for 258 answers; at most 256" in many["error"]["message"], many
    choices = two["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3], choices
    assert all(c["text"].startswith(prompts[c["index"] // 2]) for c in choices), choices
    assert streamed["error"] is None and streamed["response"]["status_code"] == 200, streamed
    assert len(streamed["response"]["body"]["choices"][0]["prompt_logprobs"]) > 1


def test_a_line_is_bounded_by_the_context_and_the_stages_n_as_agp_serve_bounds_its_body(tmp_path, tiny_gguf):
    """agp run and agp serve take the bounds of a body from the loaded pipeline alike (serve/build.py's
    served_context and stage_n): a max_tokens beyond the context, and a batch of prompts whose answers
    at the generate stage's n = 2 are more than 256, are the same 400 from both."""
    import argparse

    from starlette.testclient import TestClient

    from pipeline_dsl.commands import serve
    from pipeline_dsl.serve.build import build
    from test_run_errors import PIPELINE

    path = tmp_path / "n2.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("generate { max_new_tokens = 4 }",
                                                             "generate { max_new_tokens = 3  n = 2 }"))
    bodies = [{"prompt": "x", "max_tokens": 100000}, {"prompt": ["x"] * 129, "max_tokens": 1}]
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(batch_line(f"b{i}", COMP, b) for i, b in enumerate(bodies))
                   + batch_line("fine", COMP, {"prompt": "x", "max_tokens": 1}))     # a run all refused exits 1
    assert run(path, "-i", inp, "-o", out).returncode == 0
    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    serving = build(p.parse_args([str(path), "--threads", "1"]))
    try:
        with TestClient(serving.app, base_url="http://localhost") as client:
            answers = [client.post("/v1/completions", json=b) for b in bodies]
    finally:
        serving.runtime.close()
    for line, answer in zip(records(out), answers):
        assert line["response"]["status_code"] == answer.status_code == 400, (line, answer.text)
        assert line["response"]["body"] == answer.json(), (line, answer.text)
    context, many = answers
    assert context.json()["error"]["param"] == "max_tokens" and "beyond the context of" in context.text
    assert "129 prompts x n = 2 asks for 258 answers" in many.json()["error"]["message"]


def test_an_error_record_carries_the_status_and_body_serve_would_have_answered():
    """A line that fails in a stage is the 5xx agp serve answers (a refused one its 4xx): the
    record's response.status_code and body are that answer's, its error the code and message."""
    from pipeline_dsl.commands.batch_api import error_record
    from pipeline_dsl.serve.api_error import APIError

    for status, code in ((500, "stage_failed"), (429, "queue_full"), (400, None)):
        err = APIError("why", status=status, type="server_error", code=code, param="g")
        assert error_record("c1", 3, err, "cmpl-3") == {
            "id": "batch_req_3", "custom_id": "c1",
            "response": {"status_code": status, "request_id": "cmpl-3", "body": err.body()},
            "error": {"code": code or "server_error", "message": "why", "line": 3}}


ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"]}}}


def test_a_plain_lines_tool_calls_come_back_parsed_as_agp_serve_and_a_batch_line_answer_them(tmp_path, long_gguf):
    """A line with tools is answered as agp serve answers the same chat request: the calls the
    model wrote as `tool_calls` (name, JSON arguments) with finish_reason "tool_calls" ("stop" for a
    call a named tool_choice forced, as OpenAI's and vLLM's), the text
    what is left of the answer (null when nothing is), not the model's raw call markup; under
    tool_choice "none" nothing is parsed. A batch-API line of the same body is the oracle."""
    pipeline = tmp_path / "long.agp"                 # a context with room for the tools' prompt
    pipeline.write_text(PIPELINE.format(model=long_gguf).replace("budget = 1MiB", "budget = 8MiB"))
    chat = [{"role": "user", "content": "add two numbers"}]
    forced = {"messages": chat, "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "add"}},
              "max_tokens": 200, "temperature": 0}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "call", **forced}) + "\n"
                   + json.dumps({"id": "none", "messages": chat, "tools": [ADD], "tool_choice": "none",
                                 "max_tokens": 3}) + "\n")
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    call, none = records(out)
    assert call["finish_reason"] == "stop", call
    assert call["text"] is None and "<tool_call>" not in json.dumps(call)
    [got] = call["tool_calls"]
    assert got["type"] == "function" and got["id"] and got["function"]["name"] == "add"
    assert set(json.loads(got["function"]["arguments"])) == {"a", "b"}
    assert "tool_calls" not in none and isinstance(none["text"], str) and none["finish_reason"] != "tool_calls"

    batch, answered = tmp_path / "batch.jsonl", tmp_path / "batch_out.jsonl"
    batch.write_text(batch_line("call", CHAT, forced))
    assert run(pipeline, "-i", batch, "-o", answered).returncode == 0
    [served] = records(answered)[0]["response"]["body"]["choices"]
    assert served["finish_reason"] == call["finish_reason"] and served["message"]["content"] == call["text"]
    assert [c["function"] for c in served["message"]["tool_calls"]] == [got["function"]]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}


def test_a_forced_tool_call_beside_a_format_says_on_its_record_and_once_on_stderr_that_the_format_was_set_aside(
        tmp_path, long_gguf):
    """agp serve answers a forced tool call beside a response_format with a Warning header saying the
    format does not hold the answer (the call does). agp run said nothing: each such line's record
    carries the same words as `warning` (a plain line's and a batch-API line's), naming the field as
    the line wrote it, stderr says it once, and a line whose tool_choice forces nothing, or whose
    format is free text, has none."""
    pipeline = tmp_path / "long.agp"                 # a context with room for the tools' prompt
    pipeline.write_text(PIPELINE.format(model=long_gguf).replace("budget = 1MiB", "budget = 8MiB"))
    chat = [{"role": "user", "content": "add two numbers"}]
    base = {"messages": chat, "tools": [ADD], "max_tokens": 60, "temperature": 0}
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    lines = [{"id": "req", **base, "tool_choice": "required", "response_format": schema},
             {"id": "named", **base, "tool_choice": {"type": "function", "function": {"name": "add"}},
              "guided_json": PERSON},
             {"id": "auto", **base, "max_tokens": 3, "tool_choice": "auto", "response_format": {"type": "json_object"}},
             {"id": "text", **base, "tool_choice": "required", "response_format": {"type": "text"}}]
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = run(pipeline, "-i", inp, "-o", out, "--stats", stats)
    assert r.returncode == 0, r.stderr
    req, named, auto, text = records(out)
    assert req["finish_reason"] == "tool_calls" and req["warning"].startswith(
        "'response_format' does not apply to this answer: 'tool_choice' forces a tool call"), req
    assert named["warning"].startswith("'guided_json' does not apply to this answer"), named
    assert "warning" not in auto and "warning" not in text, (auto, text)
    said = [line for line in r.stderr.splitlines() if "does not apply to this answer" in line]
    assert said == ["agp run: warning: line 1 (and 1 more line(s)): " + req["warning"]
                    + "; each such record's \"warning\" says so"], r.stderr
    assert json.loads(stats.read_text())["warnings"] == 2

    batch, answered = tmp_path / "batch.jsonl", tmp_path / "batch_out.jsonl"
    batch.write_text(batch_line("req", CHAT, {k: v for k, v in lines[0].items() if k != "id"})
                     + batch_line("auto", CHAT, {k: v for k, v in lines[2].items() if k != "id"}))
    r = run(pipeline, "-i", batch, "-o", answered)
    assert r.returncode == 0, r.stderr
    forced, free = records(answered)
    assert forced["warning"] == req["warning"] and forced["response"]["status_code"] == 200, forced
    assert "warning" not in free, free
    assert r.stderr.count("does not apply to this answer") == 1, r.stderr


FAN = """pipeline fan {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode {{}}
    stage kv      : kv_lookup {{ block_size = 8  budget = 1MiB }}
    stage g1      : generate {{ max_new_tokens = 2 }}
    stage g2      : generate {{ max_new_tokens = 3  n = 2 }}
    stage out     : respond {{}}
    request -> batch -> encode -> kv
    kv -> g1 -> out
    kv -> g2 -> out
}}
"""


def test_a_batch_of_prompts_through_a_fan_out_numbers_every_choice_once(tmp_path, tiny_gguf):
    """Two generate stages after one kv_lookup (n = 1 and n = 2) answer each prompt with three
    choices, more than the largest n: a completions line of two prompts numbered them prompt * 2 +
    i, so the first prompt's third choice and the second prompt's first both had index 2. Each
    index is now one choice's, the first n of each prompt at prompt * n + i as before, the ones
    past n after every prompt's, and the choices come in the order of their index."""
    path, inp, out = tmp_path / "fan.agp", tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    path.write_text(FAN.format(model=tiny_gguf))
    inp.write_text(batch_line("two", COMP, {"prompt": ["once upon", "the end"], "temperature": 0})
                   + batch_line("a", COMP, {"prompt": "once upon", "temperature": 0})
                   + batch_line("b", COMP, {"prompt": "the end", "temperature": 0}))
    r = run(path, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    two, a, b = (g["response"]["body"]["choices"] for g in records(out))
    assert [c["index"] for c in a] == [c["index"] for c in b] == [0, 1, 2]
    assert [c["index"] for c in two] == [0, 1, 2, 3, 4, 5]
    texts = {c["index"]: c["text"] for c in two}
    assert [texts[0], texts[1], texts[4]] == [c["text"] for c in a]      # the first prompt's: 0, 1, then past n
    assert [texts[2], texts[3], texts[5]] == [c["text"] for c in b]


def test_a_batch_lines_spec_only_the_engine_refuses_names_the_field_the_line_wrote(tmp_path, pipeline):
    """A spec the line's check takes but the engine's compile refuses (an object of 500 optional
    properties open to more: the grammar engine gives up after its "{") is a 400 naming the field the
    body wrote it in, as agp serve's answer names it."""
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("j", CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                          "guided_json": many})
                   + batch_line("s", COMP, {"prompt": "hi", "max_tokens": 3, "structured_outputs": {"json": many}}))
    run(pipeline, "-i", inp, "-o", out)         # every line failed: exit 1
    lines = records(out)
    assert [g["custom_id"] for g in lines] == ["j", "s"]
    for got, named in zip(lines, ("guided_json", "structured_outputs.json")):
        assert got["response"]["status_code"] == 400, got
        error = got["response"]["body"]["error"]
        assert error["param"] == named, error
        assert error["message"].startswith(f"'{named}' cannot be enforced: the grammar engine gives up on it"), error


def test_an_error_record_names_max_tokens_as_the_line_wrote_it(tmp_path, pipeline):
    """The engine words a prompt + max_tokens beyond the context with max_tokens; a line that sent
    max_completion_tokens (a plain chat line, a batch-API chat body) reads its own field's name in
    its error, as agp serve answers the same body; a line that sent max_tokens keeps max_tokens."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    chat = [{"role": "user", "content": "hi " * 40}]
    inp.write_text(json.dumps({"id": "new", "messages": chat, "max_completion_tokens": 100000}) + "\n"
                   + json.dumps({"id": "old", "messages": chat, "max_tokens": 100000}) + "\n"
                   + json.dumps({"id": "fine", "prompt": "hi", "max_completion_tokens": 2}) + "\n")
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    new, old, fine = records(out)
    assert new["error"]["code"] == "context_length_exceeded" and new["error"]["status"] == 400, new
    assert "max_completion_tokens 100000" in new["error"]["message"], new
    assert "max_tokens" not in new["error"]["message"].replace("max_completion_tokens", ""), new
    assert "max_tokens 100000" in old["error"]["message"] and "error" not in fine, (old, fine)
    # a batch-API chat body: its max_completion_tokens fits the context alone, not with its prompt
    inp.write_text(batch_line("long", CHAT, {"messages": chat, "max_completion_tokens": 450})
                   + batch_line("short", CHAT, {"messages": chat, "max_completion_tokens": 2}))
    out.unlink()
    assert run(pipeline, "-i", inp, "-o", out).returncode == 0
    long, short = records(out)
    assert long["response"]["status_code"] == 400 and short["error"] is None, (long, short)
    body = long["response"]["body"]["error"]
    assert body["code"] == long["error"]["code"] == "context_length_exceeded", long
    assert "max_completion_tokens 450" in body["message"] and body["message"] == long["error"]["message"], long
    assert "max_tokens" not in body["message"].replace("max_completion_tokens", ""), long


def test_a_batch_lines_metadata_is_bounded_as_openai_bounds_it(tmp_path, pipeline):
    """16 keys of at most 64 characters, values of at most 512: a line past it is its own 400 record
    naming the field, as agp serve refuses the body; one at the limit is answered."""
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    inp.write_text(batch_line("keys", CHAT, {**chat, "metadata": {f"k{i}": "v" for i in range(17)}})
                   + batch_line("long", CHAT, {**chat, "metadata": {"a": "v" * 513}})
                   + batch_line("safety", CHAT, {**chat, "safety_identifier": "s" * 65})
                   + batch_line("fine", CHAT, {**chat, "metadata": {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}}))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    keys, long, safety, fine = records(out)
    assert keys["response"]["status_code"] == 400 and "has 17 keys: at most 16" in keys["error"]["message"]
    assert keys["response"]["body"]["error"]["param"] == "metadata"
    assert long["response"]["body"]["error"]["param"] == "metadata.a" and "at most 512" in long["error"]["message"]
    assert safety["response"]["body"]["error"]["param"] == "safety_identifier"
    assert safety["error"]["message"] == ("'safety_identifier' is 65 characters long: at most 64 are taken "
                                          "(OpenAI's limit)")
    assert fine["error"] is None and fine["response"]["status_code"] == 200


def test_a_plain_lines_metadata_and_identifiers_are_not_bounded(tmp_path, pipeline):
    """agp serve's bounds on metadata, user, safety_identifier and prompt_cache_key keep a stored
    Responses answer small; a plain line's answer is written out and stored nowhere, so a line past
    them is answered (docs/language.md), where a batch-API line's body is bounded as agp serve's."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u" * 600,
            "safety_identifier": "s" * 100, "prompt_cache_key": "p" * 600,
            "metadata": {f"k{i}" + "k" * 70: "v" * 600 for i in range(20)}}
    inp.write_text(json.dumps({"id": "long", **line}) + "\n" + json.dumps({"id": "typed", **line, "user": 5}) + "\n")
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    long, typed = records(out)
    assert long.get("error") is None and long["finish_reason"] in ("stop", "length"), long
    assert typed["error"]["param"] == "user" and "'user' must be a string" in typed["error"]["message"], typed


def test_an_embeddings_line_refused_as_its_answer_is_built_is_counted_as_failed(tmp_path, pipeline):
    """A `dimensions` the model cannot give is found as the line's answer is built, after the
    pipeline ran it: its output line is a 400 error record, and the summary and --stats count it
    as one (an error, its prompt's tokens in no line's usage), as they count the line written."""
    inp, out, stats = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    inp.write_text(batch_line("dims", EMB, {"input": "x", "dimensions": 3})
                   + batch_line("dims2", EMB, {"input": ["a", "b"], "dimensions": 7})
                   + batch_line("ok", EMB, {"input": "fine"}))
    r = run(pipeline, "-i", inp, "-o", out, "--stats", stats)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["response"]["status_code"] for g in got] == [400, 400, 200]
    s = json.loads(stats.read_text())
    assert s["requests"] == 3 and s["errors"] == sum(g["error"] is not None for g in got) == 2
    assert s["prompt_tokens"] == got[2]["response"]["body"]["usage"]["prompt_tokens"]
    assert "2 failed" in r.stderr, r.stderr


def test_an_embeddings_lines_result_fails_where_its_answer_cannot_be_made_of_it():
    """BatchLine.result makes an embeddings line's answer of its inputs' results: one agp serve would
    refuse (a `dimensions` the model cannot give) is a failed result there, with no choices and no
    usage, and the output line is that result's error as agp serve's 400 words it; one it answers
    keeps its result, and its line is the body made of it."""
    from pipeline_dsl.commands.batch_api import read_line
    from pipeline_dsl.flow import Choice, Result

    def line(body):
        batch = read_line(json.loads(batch_line("e", EMB, body)), 4)
        batch.parse(512, (), "tiny")
        return batch

    def embedded(key):
        return Result(key, key, [Choice(0, "", "stop", {"pooled": [3.0, 4.0]})], None,
                      {"prompt_tokens": 2, "completion_tokens": 0, "cached_tokens": 0}, {"latency_s": 0.1})

    dims = line({"input": ["a", "b"], "dimensions": 3})
    failed = dims.result([embedded("k0"), embedded("k1")])
    assert failed.error is not None and failed.choices == [] and failed.usage["prompt_tokens"] == 0
    assert failed.metrics == {"latency_s": 0.1}
    record = dims.answer(failed, None)
    assert record["response"]["status_code"] == 400 and record["error"]["line"] == 4
    assert record["response"]["body"]["error"] == {"message": "'dimensions' = 3: this model's embeddings have 2",
                                                   "type": "invalid_request_error", "param": "dimensions", "code": None}
    ok = line({"input": "a", "dimensions": 2})
    result = ok.result([embedded("k")])
    assert result.error is None and result.usage["prompt_tokens"] == 2
    answered = ok.answer(result, None)
    body = answered["response"]["body"]
    assert body["data"][0]["embedding"] == [0.6, 0.8] and body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    # both lines in the Batch API's one shape: the input line's id, the request's, the answer's status
    assert answered == {"id": "batch_req_4", "custom_id": "e", "error": None,
                        "response": {"status_code": 200, "request_id": "embd-4", "body": body}}
    assert {k: record[k] for k in ("id", "custom_id")} == {"id": "batch_req_4", "custom_id": "e"}
    assert record["response"]["request_id"] == "embd-4" and set(record) == set(answered)


def test_a_chat_form_embeddings_line_beyond_the_context_names_messages(tmp_path, pipeline):
    """vLLM's chat form of an embeddings body (`messages`) too long for the context: its error
    record names `messages`, as agp serve's 400 does (it named `input`, a field the line has not)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("m", EMB, {"messages": [{"role": "user", "content": "word " * 700}]})
                   + batch_line("i", EMB, {"input": "word " * 700}))
    run(pipeline, "-i", inp, "-o", out)
    got = records(out)
    assert [g["response"]["status_code"] for g in got] == [400, 400]
    assert [g["response"]["body"]["error"]["param"] for g in got] == ["messages", "input"]
    assert got[0]["error"]["code"] == "context_length_exceeded"


def test_an_embeddings_line_whose_answer_cannot_be_built_fails_alone(tmp_path, tiny_gguf):
    """A python stage after generate leaves an embeddings line's pooled vector made of words: the
    answer cannot be built of it. That line is a 500 answer_failed error record, as agp serve answers
    it; the lines after it are answered still, and the summary counts the line as failed."""
    (tmp_path / "hk.py").write_text('def bad(item):\n    if "pooled" in item:\n        item["pooled"] = ["a", "b"]\n'
                                    "    return item\n")
    pipe = tmp_path / "p.agp"
    pipe.write_text(PIPELINE.format(model=tiny_gguf).replace(
        "stage out     : respond {}", 'stage fix : python { fn = "hk:bad" }\n    stage out     : respond {}')
        .replace("gen -> out", "gen -> fix -> out"))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("e1", EMB, {"input": "hi"}) + batch_line("c1", COMP, {"prompt": "hi", "max_tokens": 2}))
    r = run(pipe, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["custom_id"] for g in got] == ["e1", "c1"], r.stderr
    assert got[0]["response"]["status_code"] == 500 and got[0]["error"]["code"] == "answer_failed"
    assert got[1]["response"]["status_code"] == 200 and got[1]["error"] is None
    assert "2 (1 failed)" in r.stderr and "KeyError" not in r.stderr


def test_a_batch_lines_own_n_numbers_its_prompts_choices_not_the_stages(tmp_path, tiny_gguf):
    """A completions line of two prompts with `n = 1`, to a generate stage of `n = 3`: the line's n
    replaces the stage's (one answer a prompt), so its choices are numbered 0 and 1, as vLLM numbers
    them (they were 0 and 3, numbered as if each prompt had the stage's three)."""
    path = tmp_path / "n3.agp"
    path.write_text(PIPELINE.format(model=tiny_gguf).replace("generate { max_new_tokens = 4 }",
                                                             "generate { max_new_tokens = 2  n = 3 }"))
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("one", COMP, {"prompt": ["a b", "c d"], "n": 1, "echo": True})
                   + batch_line("two", COMP, {"prompt": ["a b", "c d"], "n": 2, "echo": True}))
    r = run(path, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    one, two = (g["response"]["body"]["choices"] for g in records(out))
    assert [(c["index"], c["text"][:3]) for c in one] == [(0, "a b"), (1, "c d")], one
    assert [(c["index"], c["text"][:3]) for c in two] == [(0, "a b"), (1, "a b"), (2, "c d"), (3, "c d")], two


def test_an_embeddings_lines_input_over_the_context_is_named_once_as_agp_serve_names_it(tmp_path, pipeline):
    """A list input whose second text is too long for the context: the error record names it once,
    `'input[1]': prompt of …`, as agp serve's 400 does (it said `'input[1]': 'prompt[1]': …`)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("two", EMB, {"input": ["hi", "word " * 700]}) + batch_line("ok", EMB, {"input": "hi"}))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    got, ok = records(out)
    assert ok["response"]["status_code"] == 200, ok
    error = got["response"]["body"]["error"]
    assert got["response"]["status_code"] == 400 and error["param"] == "input", got
    assert error["message"].startswith("'input[1]': prompt of "), error
    assert "prompt[" not in error["message"] and got["error"]["message"] == error["message"]


def test_a_completions_line_whose_later_prompt_is_over_the_context_names_that_prompt(tmp_path, pipeline):
    """A batch line's completions body with several prompts is answered as agp serve answers it: a
    prompt over the model's context fails the line with the 400 that names it (`'prompt[1]': ...`),
    not the first prompt, which fit; a client of the batch is told which prompt to fix."""
    inp, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    inp.write_text(batch_line("one", COMP, {"prompt": "hi", "max_tokens": 2})
                   + batch_line("two", COMP, {"prompt": ["hi", "the cat sat " * 400], "max_tokens": 2}))
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 0, r.stderr
    ok, line = records(out)
    assert ok["response"]["status_code"] == 200, ok
    assert line["response"]["status_code"] == 400, line
    assert line["error"]["message"].startswith("'prompt[1]': "), line["error"]
    assert line["response"]["body"]["error"]["message"] == line["error"]["message"]


def test_a_batch_lines_body_takes_whole_floats_for_its_integer_fields_as_agp_serve_does():
    """A batch line's body is read as agp serve reads a body: "max_tokens": 3.0 and token ids 5.0
    are integers (requests_io.whole_numbers), 3.5 is the field's 400."""
    from pipeline_dsl.commands.batch_api import read_line
    from pipeline_dsl.serve.api_error import APIError

    body = {"prompt": [5.0, 6.0], "max_tokens": 3.0, "n": 2.0}
    batch = read_line(json.loads(batch_line("c", COMP, body)), 1)
    batch.parse(512, (), "tiny")
    item = batch.items()[0]
    assert (item["prompt_token_ids"], item["max_tokens"], item["n"]) == ([5, 6], 3, 2)
    assert all(type(v) is int for v in (*item["prompt_token_ids"], item["max_tokens"], item["n"]))
    half = read_line(json.loads(batch_line("c", COMP, {**body, "max_tokens": 3.5})), 1)
    with pytest.raises(APIError, match="'max_tokens' must be an integer from 1 to 1048576, not 3.5"):
        half.parse(512, (), "tiny")
