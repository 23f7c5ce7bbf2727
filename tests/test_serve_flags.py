"""`agp serve`'s flags against their AGP_* variables: a flag wins over its variable, also for
the flags that take several values (--api-key, --served-model-name): it replaces the
variable's list, it never adds to it (a rotated key must stop working)."""
from __future__ import annotations

import argparse
import os
from unittest import mock

import pytest

from pipeline_dsl.commands import serve


def parse(argv, environ):
    p = argparse.ArgumentParser(prog="agp serve")
    with mock.patch.dict(os.environ, environ, clear=False):
        serve.add_arguments(p)
    return p.parse_args(argv)


def test_api_key_flag_replaces_the_variable_instead_of_adding_to_it():
    env = {"AGP_API_KEY": "old", "AGP_SERVED_MODEL_NAME": "a,b"}
    args = parse(["x.agp", "--api-key", "new", "--served-model-name", "c"], env)
    assert args.api_key == ["new"] and args.served_model_name == ["c"]
    args = parse(["x.agp", "--api-key", "k1", "k2", "--api-key", "k3"], env)
    assert args.api_key == ["k1", "k2", "k3"]                     # several flags still add up
    args = parse(["x.agp"], env)
    assert args.api_key == ["old"] and args.served_model_name == ["a", "b"]
    assert parse(["x.agp", "--api-key", "new"], {}).api_key == ["new"]
    assert parse(["x.agp"], {}).api_key is None


def test_a_no_switch_reads_its_own_variable_as_well():
    # "every flag has an environment variable" (docs/serve.md): --no-access-log's is AGP_NO_ACCESS_LOG
    assert parse(["x.agp"], {}).access_log is True
    assert parse(["x.agp"], {"AGP_NO_ACCESS_LOG": "1"}).access_log is False
    assert parse(["x.agp"], {"AGP_NO_ACCESS_LOG": "false"}).access_log is True
    assert parse(["x.agp"], {"AGP_ACCESS_LOG": "0"}).access_log is False
    assert parse(["x.agp", "--access-log"], {"AGP_NO_ACCESS_LOG": "1"}).access_log is True   # the flag wins
    assert parse(["x.agp"], {"AGP_NO_PREFIX_REUSE": "true"}).no_prefix_reuse is True


def test_every_flags_variable_follows_the_documented_rule():
    # "AGP_ and the flag's name in capitals with _ for -" (docs/serve.md): --pipeline's is
    # AGP_PIPELINE (it was named after its longest alias, AGP_PIPELINE_NAME)
    assert parse(["x.agp"], {"AGP_PIPELINE": "second"}).name == "second"
    assert parse(["x.agp", "--pipeline", "first"], {"AGP_PIPELINE": "second"}).name == "first"
    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            flag = next(o for o in a.option_strings if o.startswith("--"))
            assert f"[env AGP_{flag[2:].upper().replace('-', '_')}]" in (a.help or ""), flag


def test_the_api_key_help_names_every_route_left_open():
    from pipeline_dsl.serve.config import OPEN_PATHS

    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    text = " ".join(p.format_help().split())
    assert all(path in text.split("(401 otherwise);", 1)[1].split("stay open")[0] for path in OPEN_PATHS)


def test_an_agp_variable_nothing_reads_is_named_with_the_closest_one():
    from pipeline_dsl.serve.options import unknown_variables

    p = argparse.ArgumentParser(prog="agp serve")
    serve.add_arguments(p)
    env = {"AGP_MAX_NUM_SEQ": "4", "AGP_MAX_NUM_SEQS": "4", "AGP_NATIVE": "0", "AGP_NO_ACCESS_LOG": "1",
           "AGP_ZZZ": "1", "HOME": "/root"}
    assert unknown_variables(p, env) == [
        "environment variable AGP_MAX_NUM_SEQ is set but is not one of agp's (did you mean AGP_MAX_NUM_SEQS?);"
        " it is ignored",
        "environment variable AGP_ZZZ is set but is not one of agp's; it is ignored"]


def test_every_agp_variable_the_code_reads_is_known_to_the_warning():
    import re
    from pathlib import Path

    from pipeline_dsl.serve.options import ENGINE_VARIABLES

    root = Path(__file__).resolve().parents[1]
    read = {v for f in [*(root / "pipeline_dsl").rglob("*.py"), *(root / "stages").rglob("*.py")]
            for v in re.findall(r"""["'](AGP_[A-Z_]+)["']""", f.read_text())}
    assert read and read <= set(ENGINE_VARIABLES)


def test_a_variable_that_is_no_number_is_named_with_what_its_flag_takes(capsys):
    # AGP_PORT=abc said "invalid literal for int() with base 10: 'abc'": Python's words, not agp's
    for env, said in (({"AGP_PORT": "abc"}, "environment variable AGP_PORT='abc': --port takes an integer"),
                      ({"AGP_DRAIN_TIMEOUT": "x"}, "environment variable AGP_DRAIN_TIMEOUT='x': --drain-timeout "
                                                   "takes a number")):
        with pytest.raises(SystemExit) as e:
            parse(["x.agp"], env)
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "literal" not in err and "convert" not in err
    assert parse(["x.agp"], {"AGP_PORT": "9000", "AGP_DRAIN_TIMEOUT": "2.5"}).port == 9000


@pytest.mark.parametrize("env, said", [
    ({"AGP_MAX_NUM_SEQS": "0"}, "environment variable AGP_MAX_NUM_SEQS='0': must be at least 1, not 0"),
    ({"AGP_PORT": "70000"}, "environment variable AGP_PORT='70000': must be between 0 and 65535, not 70000"),
    ({"AGP_DRAIN_TIMEOUT": "nan"}, "environment variable AGP_DRAIN_TIMEOUT='nan': must be a positive number of "
                                   "seconds, not nan"),
    ({"AGP_STATS_INTERVAL": "-1"}, "environment variable AGP_STATS_INTERVAL='-1': must be 0 (off) or a positive"),
    ({"AGP_MAX_BODY_BYTES": "10"}, "environment variable AGP_MAX_BODY_BYTES='10': must be at least 1024, not 10"),
    ({"AGP_ROOT_PATH": "llm"}, "environment variable AGP_ROOT_PATH='llm': must start with '/', not 'llm'"),
    ({"AGP_CHAT_TEMPLATE": "missing.jinja"}, "environment variable AGP_CHAT_TEMPLATE='missing.jinja': "
                                             "missing.jinja: no such file"),
    ({"AGP_SEED": str(1 << 64)}, f"environment variable AGP_SEED='{1 << 64}': must be an integer from "
                                 f"{-(1 << 63)} to {(1 << 63) - 1}, not {1 << 64}"),
    ({"AGP_REPLICAS": "0"}, "environment variable AGP_REPLICAS='0': must be at least 1, not 0"),
    ({"AGP_TARGET_ONGOING_REQUESTS": "-2"}, "environment variable AGP_TARGET_ONGOING_REQUESTS='-2': must be "
                                            "positive, not -2"),
])
def test_a_variable_out_of_its_flags_range_is_named_by_the_variable(capsys, env, said):
    """AGP_MAX_NUM_SEQS=0 said "--max-num-seqs must be at least 1, not 0": a flag the user never gave."""
    with pytest.raises(SystemExit) as e:
        parse(["x.agp"], env)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err, err
    assert " --" not in err.split("error:", 1)[1]
    from pipeline_dsl.serve.options import SetupError, check_args

    name, bad = next(iter(env.items()))             # the same value as the flag: named by the flag
    flag = "--" + name[len("AGP_"):].lower().replace("_", "-")
    with pytest.raises(SetupError, match=f"^{flag} "):
        check_args(parse(["x.agp", flag, bad, *(["--ray"] if "replicas" in flag or "ongoing" in flag else [])], {}))


@pytest.mark.parametrize("flag, value", [("--header-timeout", "nan"), ("--drain-timeout", "inf"),
                                         ("--body-timeout", "nan"), ("--send-timeout", "inf"),
                                         ("--keep-alive-timeout", "nan"), ("--keep-alive-timeout", "inf"),
                                         ("--stats-interval", "nan"), ("--stats-interval", "inf")])
def test_a_timeout_that_is_not_a_finite_number_of_seconds_stops_the_start(flag, value):
    """AGP_HEADER_TIMEOUT=nan started a server whose every connection failed with a traceback
    in the log (a timer of nan seconds) and hung its client; --drain-timeout nan said "0 in
    flight get up to nans". Each is refused at start, naming the flag."""
    from pipeline_dsl.serve.options import SetupError, check_args

    with pytest.raises(SetupError, match=f"^{flag} must be .*a positive number of seconds, not {value}$"):
        check_args(parse(["x.agp", flag, value], {}))
    check_args(parse(["x.agp", flag, "2.5"], {}))


@pytest.mark.parametrize("argv, env, said", [
    (["--keep-alive-timeout", "0"], {}, "--keep-alive-timeout must be a positive number of seconds, not 0.0"),
    (["--keep-alive-timeout", "soon"], {}, "--keep-alive-timeout: invalid float value: 'soon'"),
    ([], {"AGP_KEEP_ALIVE_TIMEOUT": "-5"}, "AGP_KEEP_ALIVE_TIMEOUT='-5': must be a positive number of seconds, not -5.0"),
])
def test_a_bad_keep_alive_timeout_stops_the_start_naming_the_flag_or_the_variable(tmp_path, capsys, monkeypatch,
                                                                                   argv, env, said):
    from pipeline_dsl import cli

    path = tmp_path / "x.agp"
    path.write_text("")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = cli.main(["serve", str(path), "--port", "0", *argv])
    except SystemExit as e:                        # argparse's own refusal of a value that is no number
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and said in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, env, said", [
    (["--max-model-len", "100000"], {}, "--max-model-len 100000 is beyond the model's context of 512 tokens"),
    ([], {"AGP_MAX_MODEL_LEN": "100000"}, "AGP_MAX_MODEL_LEN=100000 is beyond the model's context of 512 tokens"),
    (["--max-model-len", "9000"], {"AGP_MAX_MODEL_LEN": "100000"},        # the flag wins, and is named
     "--max-model-len 9000 is beyond the model's context of 512 tokens"),
])
def test_a_max_model_len_beyond_the_models_context_names_the_flag_or_the_variable(
        tmp_path, tiny_gguf, capsys, monkeypatch, argv, env, said):
    """It said "max_model_len must be between 1 and the model's context (512), not 100000",
    naming neither --max-model-len nor AGP_MAX_MODEL_LEN, whichever the user set."""
    from pipeline_dsl import cli
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", str(path), "--port", "0", "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err, err
    assert "Traceback" not in err


def test_a_prompt_limit_set_by_the_variable_is_named_by_the_variable(tmp_path, tiny_gguf, monkeypatch):
    """AGP_MAX_INPUT_TOKENS=8: a longer prompt was refused as over "--max-input-tokens 8"."""
    from pipeline_dsl.engine import SamplingParams
    from pipeline_dsl.engine.errors import ContextLengthError
    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    for argv, env, said in ((["--max-input-tokens", "8"], {}, "(--max-input-tokens 8)"),
                            ([], {"AGP_MAX_INPUT_TOKENS": "8"}, "(AGP_MAX_INPUT_TOKENS=8)")):
        serving = build(parse([str(path), "--threads", "1", *argv], env))
        try:
            with pytest.raises(ContextLengthError) as e:
                serving.runtime.segments[0].engine.add_request("a", prompt_token_ids=[5] * 9,
                                                               params=SamplingParams(max_tokens=1))
            assert said in str(e.value)
        finally:
            serving.runtime.close()


def test_a_server_on_a_loopback_address_answers_for_localhost_and_its_address_only(tmp_path, tiny_gguf):
    """docs/serve.md, --allowed-hosts: a server listening on 127.0.0.1 answers a Host header of
    localhost (a browser's http://localhost:8000) and of its addresses, and refuses any other
    name (DNS rebinding); one listening on every address answers any."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    for host, answered, refused in (("127.0.0.1", ["localhost:8000", "LOCALHOST", "127.0.0.1:8000", "[::1]:8000"],
                                     ["rebind.example:8000"]),
                                    ("0.0.0.0", ["rebind.example:8000", "localhost"], [])):
        serving = build(parse([str(path), "--threads", "1", "--host", host], {}))
        try:
            client = TestClient(serving.app)
            for name in answered:
                assert client.get("/version", headers={"host": name}).status_code == 200, (host, name)
            for name in refused:
                assert client.get("/version", headers={"host": name}).status_code == 400, (host, name)
        finally:
            serving.runtime.close()


@pytest.mark.parametrize("argv, said", [
    (["--body-min-rate", "-1"], "--body-min-rate must be 0 (off) or a positive number of bytes per second, not -1.0"),
    (["--body-min-rate", "nan"], "--body-min-rate must be 0 (off) or a positive number of bytes per second, not nan"),
    (["--max-body-bytes-arriving", "2048", "--max-body-bytes", "4096"],
     "--max-body-bytes-arriving (2048) must be at least --max-body-bytes (4096)"),
])
def test_the_limits_of_bodies_still_arriving_are_checked_at_start(argv, said):
    """Refused at start, naming the flag: a negative or nan minimum rate would make every body
    late at once (or never), and a budget for the bodies arriving below --max-body-bytes would
    refuse every body of the largest size accepted with a 503 that no retry cures."""
    from pipeline_dsl.serve.options import SetupError, check_args

    with pytest.raises(SetupError) as e:
        check_args(parse(["x.agp", *argv], {}))
    assert str(e.value) == said
    check_args(parse(["x.agp", "--body-min-rate", "0", "--max-body-bytes-arriving", "4096",
                      "--max-body-bytes", "4096"], {}))


def test_vllms_api_key_variable_keeps_a_migrated_deployment_closed(tmp_path, tiny_gguf):
    """vLLM reads its key from VLLM_API_KEY; a deployment that kept it and not AGP_API_KEY came up
    with no key at all, answering everyone. AGP_API_KEY and --api-key still win over it."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    assert parse(["x.agp"], {"VLLM_API_KEY": "vk"}).api_key == ["vk"]
    assert parse(["x.agp"], {"VLLM_API_KEY": "vk", "AGP_API_KEY": "ak"}).api_key == ["ak"]
    assert parse(["x.agp", "--api-key", "fk"], {"VLLM_API_KEY": "vk"}).api_key == ["fk"]
    assert parse(["x.agp"], {"VLLM_API_KEY": ""}).api_key is None
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    serving = build(parse([str(path), "--threads", "1"], {"VLLM_API_KEY": "vk"}))
    try:
        client = TestClient(serving.app, base_url="http://localhost")
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer vk"}).status_code == 200
    finally:
        serving.runtime.close()


@pytest.mark.parametrize("given, tokens", [("4096", 4096), ("32k", 32000), ("32K", 32768), ("25.6k", 25600),
                                           ("1M", 1 << 20), ("auto", None), ("-1", None)])
def test_max_model_len_takes_vllms_spellings(given, tokens):
    """vLLM's --max-model-len takes k/m/g (decimal) and K/M/G (binary) suffixes and auto or -1 (as
    much as memory holds: agp's default already); `--max-model-len 32k` was "invalid int value"."""
    assert parse(["x.agp", "--max-model-len", given], {}).max_model_len == tokens
    assert parse(["x.agp"], {"AGP_MAX_MODEL_LEN": given}).max_model_len == tokens


def test_max_model_len_that_is_no_number_of_tokens_says_how_to_write_one(capsys):
    for argv in (["--max-model-len", "32q"], ["--max-model-len", "2.5"]):
        with pytest.raises(SystemExit) as e:
            parse(["x.agp", *argv], {})
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--max-model-len" in err and "number of tokens" in err, err


def test_allowed_origins_takes_vllms_json_list(tmp_path, tiny_gguf):
    """vLLM's --allowed-origins is a JSON list ('["https://app.example"]'); read as comma-separated text
    it became the origins '["https://app.example"' and so on, which no browser sends: every call from
    the page was refused by CORS, and nothing said why."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    listed = '["https://app.example", "http://b.example:8080"]'
    assert parse(["x.agp", "--allowed-origins", listed], {}).allowed_origins == [
        "https://app.example", "http://b.example:8080"]
    assert parse(["x.agp"], {"AGP_ALLOWED_ORIGINS": listed}).allowed_origins == [
        "https://app.example", "http://b.example:8080"]
    assert parse(["x.agp", "--allowed-origins", "https://app.example,*"], {}).allowed_origins == [
        "https://app.example", "*"]
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    serving = build(parse([str(path), "--threads", "1", "--allowed-origins", listed], {}))
    try:
        client = TestClient(serving.app, base_url="http://localhost")
        r = client.options("/v1/chat/completions", headers={"Origin": "http://b.example:8080",
                                                             "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://b.example:8080"
    finally:
        serving.runtime.close()


def test_allowed_origins_takes_null_the_origin_a_local_file_or_sandboxed_page_sends():
    """A page opened from a file:// URL or a sandboxed iframe sends `Origin: null`: 'null' is an
    origin --allowed-origins takes (as its variable), beside '*' and scheme://host[:port]."""
    assert parse(["x.agp", "--allowed-origins", "null,https://app.example"], {}).allowed_origins == [
        "null", "https://app.example"]
    assert parse(["x.agp"], {"AGP_ALLOWED_ORIGINS": '["null"]'}).allowed_origins == ["null"]


def test_allowed_origins_star_lets_any_page_call_without_the_users_credentials(tmp_path, tiny_gguf):
    """--allowed-origins '*' answers any page `Access-Control-Allow-Origin: *` and never allows
    credentials: a browser then sends no cookie or HTTP authentication of the user's to the server
    from another site's page. With credentials allowed, the server names each page's own origin
    back with `Access-Control-Allow-Credentials: true`, and any site could call it as the user.
    Origins named one by one may send credentials (each page is one the operator trusts)."""
    from starlette.testclient import TestClient

    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    preflight = {"Origin": "https://any.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed, credentials in (("*", "*", None), ("https://any.example", "https://any.example", "true")):
        serving = build(parse([str(path), "--threads", "1", "--allowed-origins", origins], {}))
        try:
            client = TestClient(serving.app, base_url="http://localhost")
            for r in (client.options("/v1/chat/completions", headers=preflight),
                      client.get("/v1/models", headers={"Origin": "https://any.example"})):
                assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed, (origins, r.headers)
                assert r.headers.get("access-control-allow-credentials") == credentials, (origins, r.headers)
        finally:
            serving.runtime.close()


@pytest.mark.parametrize("given, said", [
    ("https://app.example/", "'https://app.example/' is not an origin"),        # a trailing slash: never sent
    ("app.example", "'app.example' is not an origin"),
    ('["https://app.example"', "is not a JSON list of origins"),
    ("[" * 3000, "is not a JSON list of origins (nested too deeply to read)"),    # past Python's stack
])
def test_an_allowed_origin_no_browser_sends_stops_the_start(capsys, given, said):
    with pytest.raises(SystemExit) as e:
        parse(["x.agp", "--allowed-origins", given], {})
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_override_generation_config_nested_past_python_s_stack_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["x.agp", "--override-generation-config", "[" * 3000], {})
    assert e.value.code == 2 and "nested too deeply to read" in capsys.readouterr().err


def test_chat_template_takes_the_template_itself_as_vllm_does(tmp_path, tiny_gguf, capsys):
    """vLLM's --chat-template is a file or the template in one line; given inline, it was refused
    as '<the template>: no such file'."""
    from pipeline_dsl import cli
    from pipeline_dsl.serve.build import build
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=8, max_batch_size=2, timeout=20))
    inline = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}=>"
    serving = build(parse([str(path), "--threads", "1", "--chat-template", inline], {}))
    try:
        rendered = serving.runtime.tokenise({"messages": [{"role": "user", "content": "hey"}]}, None)
        assert serving.runtime.detokenise(rendered, None) == "[hey]=>"
    finally:
        serving.runtime.close()
    # one that does not parse stops the start, saying so without repeating it as a path
    assert cli.main(["serve", str(path), "--port", "0", "--chat-template", "{% for m in messages %}"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template (the template given inline):" in err and "no such file" not in err, err


def test_an_idle_connection_is_kept_75_seconds_unless_told_otherwise():
    """The keep-alive outlives the clients' own pool expiry (httpx and the openai client: 5 s, load
    balancers: 60 s), so a client never sends on a connection the server is closing; the flag and
    AGP_KEEP_ALIVE_TIMEOUT set it."""
    from pipeline_dsl.serve.server import KEEP_ALIVE_S
    assert parse(["x.agp"], {}).keep_alive_timeout == KEEP_ALIVE_S == 75.0
    assert parse(["x.agp", "--keep-alive-timeout", "120"], {}).keep_alive_timeout == 120.0
    assert parse(["x.agp"], {"AGP_KEEP_ALIVE_TIMEOUT": "90"}).keep_alive_timeout == 90.0
