"""`agp run` and the runtime: pipeline settings reach the engine, JSONL in and out,
bad lines reported with their line number while every other line still runs."""

import json
from pathlib import Path

import pytest

import clikit
from pipeline_dsl.flow.segment import segment_spec
from pipeline_dsl.graph import segments_of
from pipeline_dsl.requests_io import RequestError, parse_line, parse_request
from pipeline_dsl.flow import build_runtime, load_graph

ROOT = Path(__file__).resolve().parent.parent

PIPELINE = """
pipeline tiny {{
    model = "{model}"
    mode  = {mode}
    device = cpu
    stage request : requests      {{ max_queue = 64  max_prompt_tokens = 100 }}
    {system}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 2ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 6  temperature = 0 }}
    stage out     : respond       {{}}
    request -> {first} batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def write_pipeline(tmp_path, model, mode="balanced", system=None) -> Path:
    sys_stage = f'stage system : system_prompt {{ text = "{system}" }}' if system else ""
    text = PIPELINE.format(model=model, mode=mode, system=sys_stage, first="system ->" if system else "")
    path = tmp_path / f"{mode}.agp"
    path.write_text(text, encoding="utf-8")
    return path


def spec_of(path):
    graph = load_graph(path)
    return segment_spec(graph, segments_of(graph)[0])


def test_pipeline_settings_reach_the_engine_config(tmp_path, tiny_gguf):
    graph = load_graph(write_pipeline(tmp_path, tiny_gguf))
    rt = build_runtime(graph, overrides={"threads": 1})
    cfg = rt.segments[0].config
    assert (cfg.max_batch_size, cfg.batch_timeout_s, cfg.block_size, cfg.kv_budget_bytes) == (4, 0.002, 8, 1 << 20)
    assert (cfg.max_prompt_tokens, cfg.prefix_reuse, cfg.threads) == (100, True, 1)
    assert rt.max_queue == 64 and rt.max_in_flight == 64 + 4
    assert rt.segments[0].defaults["gen"].max_tokens == 6
    assert [s.name for s in rt.plan.streams] == ["host", "copy", "compute"]
    rt.shutdown()


def test_every_engine_stage_option_reaches_the_segment(tmp_path, tiny_gguf):
    """Each option of dynamic_batch, encode, kv_lookup and generate set away from its default in
    the file reaches what the engine is built from (its config fields, the encode switches, the
    generate stage's sampling defaults): an option dropped on the way would be ignored silently."""
    from stages.impl import Generate

    sampling = {"max_new_tokens": ("max_tokens", "6"), "temperature": ("temperature", "0.5"),
                "top_p": ("top_p", "0.9"), "top_k": ("top_k", "7"), "seed": ("seed", "11"),
                "ignore_eos": ("ignore_eos", "true"), "presence_penalty": ("presence_penalty", "0.5"),
                "frequency_penalty": ("frequency_penalty", "0.25"),
                "repetition_penalty": ("repetition_penalty", "1.5"), "min_p": ("min_p", "0.05"),
                "min_tokens": ("min_tokens", "2")}
    assert {k: v[0] for k, v in sampling.items()} == Generate.SAMPLING      # a new option joins this table
    gen = "  ".join(f"{k} = {v}" for k, (_, v) in sampling.items())
    text = (PIPELINE.format(model=tiny_gguf, mode="balanced", system="", first="")
            .replace("{ max_batch_size = 4  timeout = 2ms }",
                     "{ max_batch_size = 4  timeout = 2ms  padding = false  policy = static  "
                     "scheduling_policy = priority  max_tokens_per_step = 64  itl_target = 20ms  "
                     "long_prefill_threshold = 300 }")
            .replace("encode        {}", "encode { chat_template = false  add_special_tokens = false }")
            .replace("{ block_size = 8  budget = 1MiB }", "{ block_size = 8  budget = 1MiB  reuse = none }")
            .replace("{ max_new_tokens = 6  temperature = 0 }", "{ " + gen + "  n = 3 }"))
    path = tmp_path / "options.agp"
    path.write_text(text, encoding="utf-8")
    spec = spec_of(path)
    assert {k: spec.engine.get(k) for k in ("max_batch_size", "batch_timeout_s", "padding", "policy",
                                             "scheduling_policy", "max_tokens_per_step", "itl_target_s",
                                             "long_prefill_threshold",
                                             "block_size", "kv_budget_bytes", "prefix_reuse")} == {
        "max_batch_size": 4, "batch_timeout_s": 0.002, "padding": False, "policy": "static",
        "scheduling_policy": "priority", "max_tokens_per_step": 64, "itl_target_s": 0.02, "long_prefill_threshold": 300,
        "block_size": 8,
        "kv_budget_bytes": 1 << 20, "prefix_reuse": False}
    assert (spec.chat_template, spec.add_special_tokens) == (False, False)
    assert spec.sampling["gen"] == {field: json.loads(v) for field, v in sampling.values()}
    assert spec.n["gen"] == 3


def test_efficient_mode_chooses_int8_weights(tmp_path, tiny_gguf):
    assert spec_of(write_pipeline(tmp_path, tiny_gguf, mode="efficient")).engine["dtype"] == "int8"
    assert spec_of(write_pipeline(tmp_path, tiny_gguf, mode="performance")).engine["compile"] is True


def test_system_prompt_stage_puts_its_message_first():
    from stages.impl import StageContext, SystemPrompt

    stage = SystemPrompt("system", {"text": "Be brief.", "override": False}, StageContext("p", "system", "s", None))
    got = stage.process({"messages": [{"role": "user", "content": "hi"}]})
    assert got["messages"][0] == {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    assert stage.process({"messages": list(own)})["messages"] == own   # a request's own system message wins
    assert "messages" not in stage.process({"prompt": "raw text"})
    override = SystemPrompt("s", {"text": "Be brief.", "override": True}, StageContext("p", "s", "s", None))
    assert override.process({"messages": list(own)})["messages"] == [  # its message instead of the request's
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_request_lines_are_validated_field_by_field():
    assert parse_line('{"id": "a", "prompt": "hi", "max_tokens": 3}', 1).sampling == {"max_tokens": 3}
    for line, words in [('{"prompt": ', "not valid JSON"),
                        ('{"id": 1}', "exactly one of 'prompt'"),
                        ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
                        ('{"prompt": "x", "temprature": 1}', "did you mean 'temperature'"),
                        ('{"messages": []}', "empty"),
                        ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
                        ('{"prompt": "x", "stop": [1]}', "stop"),
                        ('{"messages": [{"role": "user", "content": "x"}], "continue_final_message": 1}',
                         "'continue_final_message' must be true or false")]:
        with pytest.raises(RequestError, match=words):
            parse_line(line, 1)
    assert parse_request({"prompt": "x", "stop": "END"}).sampling["stop"] == ["END"]


@pytest.mark.parametrize("line, words", [
    ({"text": "What is ML?", "sampling_params": {"max_new_tokens": 8}},        # SGLang's /generate and batches
     "unknown field 'text' (a request's prompt is 'prompt' (text) or 'messages' (chat))"),
    ({"text_input": "What is ML?", "max_tokens": 20},                           # Triton's generate endpoint
     "unknown field 'text_input' (a request's prompt is 'prompt' (text) or 'messages' (chat))"),
    ({"inputs": "What is ML?"},                                                 # TGI's, KServe v2's
     "unknown field 'inputs' (a request's prompt is 'prompt' (text) or 'messages' (chat))"),
    ({"prompt": "What is ML?", "parameters": {"max_new_tokens": 8}},
     "unknown field 'parameters' (a request's sampling fields stand beside its prompt, not in an object: "
     "max_tokens, temperature, top_p, stop, ...)"),
    ({"prompt": "What is ML?", "sampling_params": {"max_new_tokens": 8}},
     "unknown field 'sampling_params' (a request's sampling fields stand beside its prompt, not in an object: "
     "max_tokens, temperature, top_p, stop, ...)"),
])
def test_another_servers_request_shape_is_told_what_a_line_writes(line, words):
    """A line written for SGLang, Triton or TGI said only "unknown field 'text'" (no hint: no
    known field is close to it); the field is its param, as agp serve names an unknown one."""
    with pytest.raises(RequestError) as refused:
        parse_request(line)
    assert (str(refused.value), refused.value.param) == (words, next(iter(line)) if "prompt" not in line
                                                         else list(line)[1])


def test_a_request_line_takes_max_completion_tokens_as_chat_clients_send_it():
    """OpenAI's chat clients send max_completion_tokens (it wins over max_tokens, as agp serve's
    chat takes it); it was refused as an unknown field, with a hint at min_tokens."""
    chat = [{"role": "user", "content": "x"}]
    assert parse_request({"messages": chat, "max_completion_tokens": 5}).sampling == {"max_tokens": 5}
    assert parse_request({"prompt": "x", "max_completion_tokens": 5, "max_tokens": 9}).sampling == {"max_tokens": 5}
    for fields, words in [({"max_completion_tokens": 0}, "'max_completion_tokens' must be"),
                          ({"max_completion_tokens": 2, "min_tokens": 3}, "above 'max_completion_tokens' = 2")]:
        with pytest.raises(RequestError, match=words):
            parse_request({"messages": chat, **fields})


def test_an_assistant_message_with_null_content_and_tool_calls_is_taken():
    """OpenAI's clients send an assistant turn that only called a tool as content null: it is
    taken as empty text with its calls (any other role's null content is refused)."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"}]
    got = parse_request({"messages": chat}).messages[1]
    assert got == {"role": "assistant", "content": "", "tool_calls": [call]}
    with pytest.raises(RequestError, match=r"'messages\[0\].content' must be a string"):
        parse_request({"messages": [{"role": "user", "content": None}]})


def test_a_tool_choice_the_request_cannot_meet_is_refused_naming_tool_choice():
    """tool_choice "required" without tools, or naming a function the tools lack, asks for a call
    no answer can make: refused (a request line: exit 2; agp serve: 400), not run as free text."""
    chat = [{"role": "user", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert parse_request({"messages": chat, "tools": tools, "tool_choice": "required"}).tool_choice == "required"
    for fields, words, param in [
            ({"tool_choice": "required"}, "'tool_choice' is \"required\" but no 'tools' are given", "tool_choice"),
            ({"tool_choice": "auto"}, "'tool_choice' is \"auto\" but no 'tools' are given", "tool_choice"),
            ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
             "'tool_choice' names \"mul\", which is not among the tools", "tool_choice"),
            ({"tools": [], "tool_choice": "required"}, "'tools' is an empty array", "tools")]:
        with pytest.raises(RequestError, match=words) as refused:
            parse_request({"messages": chat, **fields})
        assert refused.value.param == param


@pytest.mark.parametrize("line", ['{"prompt": [1, 2, 3]}', '{"prompt": ["a", "b"]}'])
def test_a_prompt_array_in_a_request_line_says_where_ids_and_batches_go(line):
    # OpenAI's completions take token ids or a batch in 'prompt'; a request line holds one request
    with pytest.raises(RequestError, match=r"token ids go in 'prompt_token_ids', several prompts on lines"):
        parse_line(line, 1)
    with pytest.raises(RequestError, match=r"one of 'prompt' \(text\), 'messages' \(chat\) or 'prompt_token_ids'"):
        parse_line('{"id": 1}', 1)


def test_a_null_id_is_no_id_and_an_id_is_a_string_or_an_integer():
    # exports often write "id": null: the line number stands in (two such lines are not one id
    # twice), and an id that is no string or integer is refused naming the field, not echoed
    assert parse_line('{"id": null, "prompt": "a"}', 7).id == 7
    assert parse_line('{"id": "x", "prompt": "a"}', 7).id == "x" and parse_line('{"id": 3, "prompt": "a"}', 7).id == 3
    for bad in ("[1, 2]", '{"k": 1}', "true", "1.5"):
        with pytest.raises(RequestError, match=r"field 'id' must be a string or an integer, got ") as e:
            parse_line(f'{{"id": {bad}, "prompt": "a"}}', 1)
        assert e.value.param == "id"


@pytest.mark.parametrize("line", ['[{"prompt": "a"}, {"prompt": "b"}]', "[]", '["a"]'])
def test_a_request_line_that_is_a_json_array_says_the_input_is_json_lines(line):
    with pytest.raises(RequestError, match=r"got an array: the input is JSON Lines, one request object per line"):
        parse_line(line, 1)
    for value, said in (("3", "a number"), ("null", "null"), ('"hi"', "a string"), ("true", "a boolean")):
        with pytest.raises(RequestError, match=f"must be a JSON object, not {said}$"):   # said 'got NoneType', 'got str'
            parse_line(value, 1)


def test_agp_run_answers_in_input_order_and_reports_bad_lines(tmp_path, tiny_gguf):
    agp = write_pipeline(tmp_path, tiny_gguf)
    lines = [
        json.dumps({"id": "a", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True}),
        "{not json",
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "ignore_eos": True}),
        json.dumps({"id": "long", "prompt": "word " * 200}),            # over max_prompt_tokens
        "",
        json.dumps({"id": "c", "prompt": "abc", "temperature": 0.9, "seed": 3, "max_tokens": 4}),
        json.dumps({"id": "both", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes"}],
                    "continue_final_message": True, "add_generation_prompt": True}),
        json.dumps({"id": "goes-on", "messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "Yes"}],
                    "continue_final_message": True, "max_tokens": 2, "ignore_eos": True}),
        json.dumps({"id": "only-a", "prompt": "hello", "max_tokens": 6, "ignore_eos": True,
                    "allowed_token_ids": [100], "return_token_ids": True}),           # vLLM's fields
        json.dumps({"id": "none", "prompt": "x", "allowed_token_ids": []}),
        json.dumps({"id": "far", "prompt": "x", "allowed_token_ids": [5, 100000]}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = clikit.agp_in("run", agp, "-i", inp, "-o", out, "--stats", stats, "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "run summary" in proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 2, "b", "long", "c", "both", "goes-on", "only-a", "none", "far"]
    assert rows[0]["usage"]["completion_tokens"] == 5 and rows[0]["finish_reason"] == "length"
    assert not any("generated_by" in r for r in rows)   # named only in a pipeline of several generate stages
    assert rows[1]["error"]["line"] == 2 and "JSON" in rows[1]["error"]["message"]
    assert rows[2]["usage"]["completion_tokens"] == 3
    assert rows[3]["error"]["line"] == 4 and "max_prompt_tokens" in rows[3]["error"]["message"]
    assert rows[3]["error"]["code"] == "context_length_exceeded"           # the code agp serve answers it with
    assert "text" in rows[4]
    assert "cannot both be true" in rows[5]["error"]["message"]
    assert rows[6]["usage"]["completion_tokens"] == 2
    assert rows[7]["text"] == "a" * 6 and rows[7]["token_ids"] == [100] * 6      # token 100 is the byte "a"
    assert rows[7]["prompt_token_ids"] and "token_ids" not in rows[0]
    assert rows[8]["error"]["line"] == 10 and "'allowed_token_ids' is empty" in rows[8]["error"]["message"]
    assert "'allowed_token_ids' holds token id 100000, outside the vocabulary" in rows[9]["error"]["message"]
    assert rows[9]["error"]["param"] == "allowed_token_ids" and "code" not in rows[9]["error"]
    s = json.loads(stats.read_text())
    assert s["requests"] == 10 and s["completion_tokens"] >= 10 and s["output_tokens_per_s"] > 0
    assert s["peak_memory_bytes"] > 0 and s["errors"] == 5 and s["bad_lines"] == 2


def test_agp_run_takes_a_logged_api_request_with_the_fields_agp_serve_takes(tmp_path, tiny_gguf):
    """A line copied from an API log: what concerns the HTTP exchange (stream, stream_options, user,
    store, ...) is checked and ignored, guided_* constrain the answer as agp serve's do, and a value
    agp serve refuses is the line's error record, naming the field."""
    agp = write_pipeline(tmp_path, tiny_gguf)
    chat = [{"role": "user", "content": "yes or no?"}]
    lines = [
        {"id": "logged", "messages": chat, "max_tokens": 4, "user": "u-1", "store": False, "stream": True,
         "stream_options": {"include_usage": True}, "service_tier": "auto", "request_id": "req-1",
         "safety_identifier": "s", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
         "reasoning_effort": "low", "guided_decoding_backend": "xgrammar", "guided_choice": ["yes", "no"]},
        {"id": "digits", "prompt": "x", "max_tokens": 8, "guided_regex": "[0-9]{2}", "best_of": 1},
        {"id": "json", "prompt": "x", "max_tokens": 12, "structured_outputs": {"choice": ["on", "off"]}},
        {"id": "beam", "prompt": "x", "best_of": 2},
        {"id": "two", "prompt": "x", "guided_json": {}, "response_format": {"type": "json_object"}},
        {"id": "bad-user", "prompt": "x", "user": 5},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    proc = clikit.agp_in("run", agp, "-i", inp, "-o", out, "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["logged"]["text"] in ("yes", "no"), rows["logged"]
    assert rows["digits"]["text"].isdigit() and len(rows["digits"]["text"]) == 2, rows["digits"]
    assert rows["json"]["text"] in ("on", "off"), rows["json"]
    assert "'best_of' = 2 is not supported by agp" in rows["beam"]["error"]["message"]
    assert "give at most one of 'response_format', 'guided_json'" in rows["two"]["error"]["message"]
    assert "'user' must be a string" in rows["bad-user"]["error"]["message"]


def test_agp_run_is_deterministic_with_and_without_overlap(tmp_path, soft_gguf):
    """The same answers, token for token: on soft_gguf (spread distributions) a token still in
    flight read from the wrong place changes the text after it (the tiny model repeats its input
    token whatever it reads)."""
    agp = write_pipeline(tmp_path, soft_gguf)
    from pipeline_dsl.commands.runner import RunRequest, run_pipeline

    def answers(overlap):
        got = {}
        rt = build_runtime(agp, overlap=overlap, overrides={"threads": 1})
        reqs = [RunRequest(i, i + 1, parse_request({"prompt": p, "max_tokens": 6}))
                for i, p in enumerate(["one two", "three", "four five six"])]
        run_pipeline(rt, reqs, on_done=lambda slot, rec: got.__setitem__(slot, rec["text"]), progress=False)
        rt.shutdown()
        return got

    assert answers(True) == answers(False)


def test_agp_run_bad_pipeline_and_missing_input_exit_2(tmp_path):
    bad = tmp_path / "bad.agp"
    bad.write_text("pipeline p { stage a : genrate {} }\n", encoding="utf-8")
    for args in (["run", str(bad), "-i", "/dev/null"],
                 ["run", str(ROOT / "examples" / "chat.agp"), "-i", str(tmp_path / "missing.jsonl")]):
        proc = clikit.agp_in(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "error" in proc.stderr


def test_pipeline_dtype_wins_over_the_mode_and_a_stage_dtype_over_both(tmp_path, tiny_gguf):
    path = write_pipeline(tmp_path, tiny_gguf, mode="efficient")
    path.write_text(path.read_text().replace("device = cpu", "device = cpu\n    dtype = fp32"))
    assert spec_of(path).engine["dtype"] == "fp32"
    path.write_text(path.read_text().replace("temperature = 0 }", "temperature = 0  dtype = bf16 }"))
    assert spec_of(path).engine["dtype"] == "bf16"


def test_model_that_is_not_a_gguf_or_model_folder_is_a_check_error(tmp_path, tiny_gguf):
    import pipeline_dsl

    (tmp_path / "notes.txt").write_text("x")
    for model in ("", ".", "notes.txt"):
        path = write_pipeline(tmp_path, model)
        _, diags = pipeline_dsl.load(str(path))
        assert any("model not found" in d.message for d in diags), model


def test_agp_run_writes_to_dev_null_and_refuses_a_folder_as_output(tmp_path, tiny_gguf):
    agp = write_pipeline(tmp_path, tiny_gguf)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hello", "max_tokens": 3}) + "\n", encoding="utf-8")

    def run(output):
        return clikit.agp_in("run", agp, "-i", inp, "-o", output, "--threads", "1", "--no-progress")

    proc = run("/dev/null")                        # benchmarks discard the answers
    assert proc.returncode == 0 and "run summary" in proc.stderr, proc.stderr
    proc = run(tmp_path)
    assert proc.returncode == 2 and f"cannot write {tmp_path}: it is a folder" in proc.stderr


def test_a_cpu_runs_trace_shows_the_next_steps_host_work_before_the_current_forward_ends(tmp_path, tiny_gguf):
    """agp run --trace: a host span (schedule, lookup) of a step starts while the previous step's
    forward is still running on the compute stream, as `agp plan` predicts (an order of events
    in the file, not a time bound)."""
    pipeline = write_pipeline(tmp_path, tiny_gguf)
    reqs = tmp_path / "in.jsonl"
    reqs.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"hello {i} " * (i % 4 + 1)}) + "\n"
                            for i in range(12)))
    trace = tmp_path / "run.trace.json"
    out = clikit.agp_in("run", pipeline, "-i", reqs, "-o", tmp_path / "out.jsonl", "--threads", "1", "--overlap",
                        "--trace", trace, "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X" and "micro_batch" in e["args"]]
    forward = {e["args"]["micro_batch"]: e for e in spans if e["name"] == "gen.forward"}
    host = [e for e in spans if e["cat"] == "host" and e["name"] in ("batch.schedule", "kv.lookup")]
    ahead = [e for e in host if e["args"]["micro_batch"] - 1 in forward
             and e["ts"] < forward[e["args"]["micro_batch"] - 1]["ts"] + forward[e["args"]["micro_batch"] - 1]["dur"]]
    assert len(forward) >= 6 and ahead, "no step's host work started before the previous forward ended"


def test_a_request_lines_logprobs_and_logit_bias_take_their_bounds_themselves():
    """logprobs up to 20 (vLLM's default max_logprobs), logit_bias up to 1024 tokens: the bound is
    accepted, one past it refused."""
    from pipeline_dsl.requests_io import MAX_LOGIT_BIAS

    assert parse_request({"prompt": "x", "logprobs": 20}).extras["logprobs"] == 20
    with pytest.raises(RequestError, match="'logprobs' must be an integer from 0 to 20"):
        parse_request({"prompt": "x", "logprobs": 21})
    parse_request({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS)}})
    with pytest.raises(RequestError, match=f"at most {MAX_LOGIT_BIAS} are accepted"):
        parse_request({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}})


def test_a_request_lines_empty_prompt_is_refused_and_a_bias_of_minus_100_taken():
    with pytest.raises(RequestError, match="field 'prompt' is empty"):
        parse_request({"prompt": ""})
    assert parse_request({"prompt": "x", "logit_bias": {"5": -100}}).item()
    with pytest.raises(RequestError, match="must be a number from -100 to 100"):
        parse_request({"prompt": "x", "logit_bias": {"5": -100.5}})


CASCADE = """
pipeline cascade {{
    model = "{model}"
    device = cpu
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 2ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage first   : generate      {{ max_new_tokens = 3 }}
    stage check   : python        {{ fn = "cascade_hooks:second_copy_again"  returns = any }}
    stage batch2  : dynamic_batch {{ max_batch_size = 4  timeout = 2ms }}
    stage encode2 : encode        {{}}
    stage kv2     : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage second  : generate      {{ max_new_tokens = 3 }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> first -> check
    check -> out
    check -> batch2 -> encode2 -> kv2 -> second -> out
}}
"""

CASCADE_HOOKS = '''
import threading

_seen, _lock = set(), threading.Lock()

def second_copy_again(item):
    """The first copy of a request to get here is its answer; the next is asked again of 'second'."""
    with _lock:
        again = item["id"] in _seen
        _seen.add(item["id"])
    return item["request"] if again else item
'''


def test_each_choice_of_a_run_record_names_the_generate_stage_that_made_it(tmp_path, tiny_gguf):
    """docs/language.md: `generated_by` names the stage that made the answer in a pipeline with
    several; with n = 2 through a cascade one choice comes from each stage, and each choice
    says which (the record's own generated_by is its first choice's)."""
    (tmp_path / "cascade_hooks.py").write_text(CASCADE_HOOKS, encoding="utf-8")
    agp = tmp_path / "cascade.agp"
    agp.write_text(CASCADE.format(model=tiny_gguf), encoding="utf-8")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "q", "prompt": "hello", "n": 2, "ignore_eos": True}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = clikit.agp_in("run", agp, "-i", inp, "-o", out, "--threads", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(c["generated_by"] for c in row["choices"]) == ["first", "second"]
    assert row["generated_by"] == row["choices"][0]["generated_by"]


def test_a_request_lines_logit_bias_forces_and_bans_tokens(tmp_path, tiny_gguf):
    """A line's logit_bias reaches its answer, as agp serve's does: +100 makes every token the
    biased one, -100 keeps out the token the unbiased answer begins with."""
    from pipeline_dsl.commands.runner import RunRequest, run_pipeline

    agp = write_pipeline(tmp_path, tiny_gguf)

    def token_ids(*biases):
        got = {}
        rt = build_runtime(agp, overrides={"threads": 1})
        lines = [{"prompt": "the cat", "max_tokens": 6, "ignore_eos": True, "return_token_ids": True,
                  **({"logit_bias": bias} if bias else {})} for bias in biases]
        run_pipeline(rt, [RunRequest(i, i + 1, parse_request(line)) for i, line in enumerate(lines)],
                     on_done=lambda slot, rec: got.__setitem__(slot, rec["token_ids"]), progress=False)
        rt.shutdown()
        return [got[i] for i in range(len(lines))]

    (plain,) = token_ids(None)
    other = next(t for t in range(100, 200) if t not in plain)
    forced, banned = token_ids({str(other): 100}, {str(plain[0]): -100})
    assert forced == [other] * 6
    assert banned[0] != plain[0] and plain[0] not in banned


def test_agp_runs_request_path_imports_no_web_framework():
    """`agp run` answers its requests and maps a failed one to its error record without fastapi,
    starlette or pydantic: each is imported only by `agp serve` (an `agp run` child paid for them
    at every start, some 0.5 s of CPU, before its model loaded)."""
    import subprocess
    import sys

    code = ("import sys, pipeline_dsl.commands.run, pipeline_dsl.commands.runner;"
            "print(sorted(m for m in ('fastapi', 'starlette', 'pydantic') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
