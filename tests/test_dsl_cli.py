"""The `agp` command line: exit codes, render with the real `dot`, stages, lazy commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clikit import AGP, agp_in, ctrl_c_default
from pipeline_dsl import cli

ROOT = Path(__file__).resolve().parents[1]
CHAT = str(ROOT / "examples" / "chat.agp")


def test_check_exit_codes():
    ok = agp_in("check", "examples/chat.agp")
    assert ok.returncode == 0 and ok.stderr == "" and "ok (1 pipeline)" in ok.stdout
    bad = agp_in("check", "examples/chat.agp", "examples/errors/cycle.agp")
    assert bad.returncode == 2
    assert bad.stderr.startswith("examples/errors/cycle.agp:14:11: error: cycle: kv -> gen2 -> kv")
    assert "Traceback" not in bad.stderr


def test_check_json_is_machine_readable():
    out = agp_in("check", "--json", "examples/errors/wrong_unit.agp")
    assert out.returncode == 2
    data = json.loads(out.stdout)
    assert data["ok"] is False
    assert [(d["line"], d["col"], d["severity"]) for d in data["diagnostics"]] == [(6, 47, "error"),
                                                                                    (8, 46, "error")]


def test_check_json_gives_each_diagnostics_span_from_col_to_end_col():
    """end_line/end_col close the span (exclusive): an editor underlines exactly the bad value."""
    data = json.loads(agp_in("check", "--json", "examples/errors/wrong_unit.agp").stdout)
    lines = (ROOT / "examples/errors/wrong_unit.agp").read_text().splitlines()
    spans = [(d["line"], d["end_line"], lines[d["line"] - 1][d["col"] - 1:d["end_col"] - 1])
             for d in data["diagnostics"]]
    assert spans == [(6, 6, "5MiB"), (8, 8, "100ms")]


def test_fmt_check_exits_1_when_a_file_would_change(tmp_path):
    f = tmp_path / "p.agp"
    f.write_text("pipeline p {model=\"m\"}\n")
    assert agp_in("fmt", "--check", str(f)).returncode == 1
    assert agp_in("fmt", "--write", str(f)).returncode == 0
    assert f.read_text() == 'pipeline p {\n    model = "m"\n}\n'
    assert agp_in("fmt", "--check", str(f)).returncode == 0


BAD_ON_LINE_3 = "pipeline p {\n    stage r : requests {}\n    stage x : genrate {}\n}\n"


@pytest.mark.parametrize("command", [["check"], ["fmt"], ["plan"], ["render", "-o", "{tmp}/p.dot"]])
def test_file_dash_reads_the_pipeline_from_stdin_with_positions_at_stdin(tmp_path, command):
    argv = [a.format(tmp=tmp_path) for a in command]
    good = agp_in(*argv, "-", input=(ROOT / "examples" / "chat.agp").read_text(), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert {"check": "<stdin>: ok (1 pipeline)", "fmt": "pipeline chat {", "plan": "pipeline chat:",
            "render": "wrote"}[argv[0]] in good.stdout
    if argv[0] == "render":                    # -o names the output, as it does for a file
        assert (tmp_path / "p.dot").read_text().startswith("digraph")
    if argv[0] != "fmt":                       # fmt formats what parses; the kind is check's to judge
        bad = agp_in(*argv, "-", input=BAD_ON_LINE_3)
        assert bad.returncode == 2 and "<stdin>:3:15: error: unknown stage kind 'genrate'" in bad.stderr
        assert "did you mean 'generate'?" in bad.stderr and "not found" not in bad.stderr


def test_an_include_missing_from_stdin_says_it_was_looked_for_in_the_current_folder(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "chat.agp").write_text((ROOT / "examples" / "chat.agp").read_text())
    found = agp_in("check", "-", input='use "parts/chat.agp"\n', cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    missing = agp_in("check", "-", input='use "parts/chat.agp"\n', cwd=tmp_path / "parts")
    assert missing.returncode == 2 and "<stdin>:1:5: error: include not found: 'parts/chat.agp'" in missing.stderr
    assert "relative to the current folder (the including pipeline came on standard input)" in missing.stderr
    assert "relative to the including file" not in missing.stderr


@pytest.mark.parametrize("command", [["check"], ["plan"], ["render", "-o", "{tmp}/p.dot"]])
def test_a_python_stages_module_in_the_current_folder_is_found_for_a_pipeline_on_stdin(tmp_path, command):
    """docs/language.md, Commands: a pipeline on standard input resolves its paths against the current
    folder, a python stage's `fn` module as its `use` paths: `agp fmt p.agp | agp check -` beside
    hooks.py checks what `agp check p.agp` checks."""
    (tmp_path / "hooks.py").write_text("def tag(item):\n    return item\n")
    text = (ROOT / "examples" / "chat.agp").read_text().replace(
        "stage request : requests      {}",
        'stage request : requests      {}\n    stage tag : python { fn = "hooks:tag" }').replace(
        "request -> batch", "request -> tag -> batch")
    (tmp_path / "p.agp").write_text(text)
    argv = [a.format(tmp=tmp_path) for a in command]
    assert agp_in(*argv, str(tmp_path / "p.agp"), cwd=tmp_path).returncode == 0
    piped = agp_in(*argv, "-", input=text, cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    elsewhere = agp_in("check", "-", input=text, cwd=ROOT / "examples")     
    assert elsewhere.returncode == 2           # examples/hooks.py, the current folder's, has none
    assert "<stdin>:9:31: error: module 'hooks' (" in elsewhere.stderr and "has no function 'tag'" in elsewhere.stderr


def test_fmt_of_stdin_checks_but_cannot_write_back(tmp_path):
    assert agp_in("fmt", "--check", "-", input='pipeline p {model="m"}\n').stdout == "<stdin>: would reformat\n"
    r = agp_in("fmt", "--write", "-", input='pipeline p {model="m"}\n')
    assert r.returncode == 2 and "'-' (stdin) has no file to rewrite" in r.stderr
    r = agp_in("fmt", "-", input="pipeline p {\n  model = \n}\n")
    assert r.returncode == 2 and r.stderr.startswith("<stdin>:2:9: error: missing value after '='\n    2 |   model =")


def test_no_traceback_on_bad_input(tmp_path):
    bad = tmp_path / "bad.agp"
    bad.write_bytes(b"\xff\xfe pipeline {{{")
    for args in (["check", str(bad)], ["fmt", str(bad)], ["render", str(bad)], ["check", "missing.agp"],
                 ["render", CHAT, "-o", str(tmp_path / "x.gif")], ["stages", "genrate"], ["nonsense"]):
        r = agp_in(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip()


@pytest.mark.parametrize("command", [["fmt"], ["render", "-o", "x.dot"], ["plan"], ["run", "-i", "in.jsonl"]])
def test_every_command_refuses_a_bad_file_with_the_diagnostics_of_check(tmp_path, command):
    """What check prints for a file (here an error fmt can see too), the other commands print
    byte for byte, with its exit code 2."""
    bad = tmp_path / "bad.agp"
    bad.write_text("pipeline p {\n    stage out : respond {}\n    a -> b => c\n}\n")
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    checked = agp_in("check", str(bad), cwd=tmp_path)
    r = agp_in(command[0], str(bad), *command[1:], cwd=tmp_path)
    assert (r.returncode, r.stderr) == (checked.returncode, checked.stderr) == (2, checked.stderr)
    assert checked.stderr.endswith("1 error\n")


def test_internal_errors_are_hidden_unless_debug(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kaput")
    monkeypatch.setattr(cli, "cmd_stages", boom)
    assert cli.main(["stages"]) == 1
    assert "internal error: RuntimeError: kaput" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "stages"])


def test_debug_shows_the_traceback_also_given_after_the_command_as_the_internal_errors_hint_reads(
        monkeypatch, capsys):
    """'internal error: … (run with --debug for the traceback)': `agp run P --debug` said
    'unrecognized arguments: --debug', and only `agp --debug run P` showed it."""
    def boom(args):
        raise RuntimeError("kaput")
    monkeypatch.setattr(cli, "cmd_stages", boom)
    for argv in (["stages", "--debug"], ["stages", "generate", "--debug"]):
        with pytest.raises(RuntimeError, match="kaput"):
            cli.main(argv)
    assert "unrecognized arguments" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "run", "bench"])
def test_a_vllm_flag_is_refused_with_where_agp_sets_it(command, capsys):
    """vLLM's flags that agp has no flag of that name for are still unknown (exit 2, the usage),
    and the message says where agp sets the same thing; another unknown flag gets nothing."""
    with pytest.raises(SystemExit) as e:
        cli.main([command, "examples/chat.agp", "--gpu-memory-utilization=0.9", "--enable-prefix-caching", "--frob"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --gpu-memory-utilization=0.9 --enable-prefix-caching --frob; " in err
    assert ("--gpu-memory-utilization is vLLM's: the KV cache's size is the pipeline's `kv_budget`" in err
            and "--enable-prefix-caching is vLLM's: prefix caching is on by default" in err)
    assert "--frob is" not in err


@pytest.mark.parametrize("argv, said", [
    # what a vLLM deployment's command line carries most often beside the model
    (["--enable-auto-tool-choice"],
     ["--enable-auto-tool-choice is vLLM's: tool calls are parsed whenever a request gives `tools`"]),
    (["--disable-log-requests", "--uvicorn-log-level", "info", "--disable-log-stats"],
     ["--disable-log-requests is vLLM's: agp never logs a request's prompt or parameters",
      "--uvicorn-log-level is vLLM's: one --log-level sets agp's and uvicorn's",
      "--disable-log-stats is vLLM's: the periodic stats line is --stats-interval 0"]),
    (["--download-dir=/models", "--enable-chunked-prefill", "--response-role", "bot"],
     ["--download-dir is vLLM's: agp downloads nothing: serve a local .gguf file or Hugging Face folder",
      "--enable-chunked-prefill is vLLM's: prefill is always chunked (generate's `prefill_chunk`",
      "--response-role is vLLM's: a chat answer's role is always `assistant`"]),
    (["--enable-prompt-embeds", "--trust-request-chat-template", "--enable-tokenizer-info-endpoint"],
     ["--enable-prompt-embeds is vLLM's: a prompt comes as text or token ids",
      "--trust-request-chat-template is vLLM's: a request brings no chat template of its own",
      "--enable-tokenizer-info-endpoint is vLLM's: GET /tokenizer_info is always served"]),
    (["--quantization", "awq"],      # an AWQ, GPTQ or compressed-tensors folder loads without it
     ["--quantization is vLLM's: agp reads a model's quantization from its files, as vLLM does without the flag: "
      "a Hugging Face folder's config.json quantization_config (AWQ, GPTQ, compressed-tensors' pack-quantized)"]),
])
def test_the_vllm_flags_of_a_deployment_say_what_agp_does_instead(argv, said, capsys):
    """They were refused as any unknown flag is, with nothing on what agp does about them."""
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "examples/chat.agp", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(argv)}; " in err
    for line in said:
        assert line in err, err


@pytest.mark.parametrize("command", ["run", "serve", "bench"])
def test_dtype_takes_vllms_names_as_agps_and_refuses_another_naming_both(command, capsys):
    """--dtype bfloat16 (vLLM's spelling, as its users write it) is agp's bf16, half and float16
    fp16, float and float32 fp32; another name is exit 2 listing both spellings."""
    for given, meant in (("bfloat16", "bf16"), ("half", "fp16"), ("float16", "fp16"), ("float", "fp32"),
                         ("float32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("auto", "auto")):
        args = cli.build_parser([command]).parse_args([command, "examples/chat.agp", "--dtype", given])
        assert args.dtype == meant, given
    with pytest.raises(SystemExit) as e:
        cli.build_parser([command]).parse_args([command, "examples/chat.agp", "--dtype", "double"])
    assert e.value.code == 2
    assert "'double' is none of auto, fp32, bf16, fp16, int8 (or vLLM's float32, float, bfloat16" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_render_svg_contains_every_stage_name(tmp_path):
    out = tmp_path / "sub" / "chat.svg"
    r = agp_in("render", CHAT, "-o", str(out))
    assert r.returncode == 0, r.stderr
    svg = out.read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for name in ("request", "batch", "encode", "kv", "gen", "out", "when full", "when timeout"):
        assert f">{name}<" in svg


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_render_svg_of_strings_with_control_characters_and_noncharacters(tmp_path):
    """Whatever check accepts, render draws: a string escape such as \\u0001 or \\uffff in the
    file is drawn as written, not handed raw to `dot` (which failed on it)."""
    src = Path(CHAT).read_text(encoding="utf-8").replace(
        "    request -> batch\n", '    stage sys : system_prompt { text = "a\\u0001\\u0008\\uffff\\u0000b" }\n'
                              '    request -> sys -> batch\n')
    path = tmp_path / "odd.agp"
    path.write_text(src, encoding="utf-8")
    assert agp_in("check", str(path)).returncode == 0
    r = agp_in("render", str(path), "-o", str(tmp_path / "odd.svg"))
    assert r.returncode == 0, r.stderr
    assert "text = a\\u0001\\u0008\\uffff\\0b" in (tmp_path / "odd.svg").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_render_without_o_draws_beside_the_pipeline_file_and_stdins_in_the_current_folder(tmp_path):
    """`agp render dir/p.agp` writes dir/p.svg (as plantuml and `dot -O` name theirs), whatever
    the current folder; it wrote p.svg into the current folder. Standard input has no file to
    stand beside: its picture takes the pipeline's name, in the current folder."""
    (tmp_path / "pipes").mkdir()
    here = tmp_path / "here"
    here.mkdir()
    (tmp_path / "pipes" / "my.agp").write_text(Path(CHAT).read_text(encoding="utf-8"), encoding="utf-8")
    r = agp_in("render", Path("..") / "pipes" / "my.agp", cwd=here)
    assert r.returncode == 0, r.stderr
    drawn = tmp_path / "pipes" / "my.svg"
    assert r.stdout == f"wrote {Path('..') / 'pipes' / 'my.svg'}\n" and "<svg" in drawn.read_text(encoding="utf-8")
    assert not list(here.iterdir())
    r = agp_in("render", "-", input=Path(CHAT).read_text(encoding="utf-8"), cwd=here)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "wrote chat.svg\n" and "<svg" in (here / "chat.svg").read_text(encoding="utf-8")
    r = agp_in("render", "-", "-o", "chat.svg", input=Path(CHAT).read_text(encoding="utf-8"), cwd=here)
    assert r.returncode == 0 and r.stdout == "wrote chat.svg\n", r.stderr      # drawn anew over its picture


def test_render_refuses_to_draw_over_the_pipeline_file_itself(tmp_path):
    """A pipeline file named p.svg: its default picture, p.svg beside it, is the file itself; so
    is `-o` naming it. Refused, exit 2, the file kept (dot would have written over it)."""
    path = tmp_path / "p.svg"
    text = Path(CHAT).read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    for args in ([path], [path, "-o", path]):
        r = agp_in("render", *args, cwd=tmp_path)
        assert r.returncode == 2 and f"cannot write '{path}': it is the pipeline file {path} itself" in r.stderr
        assert path.read_text(encoding="utf-8") == text


def test_render_refuses_the_pipeline_file_under_another_name_too(tmp_path):
    """`-o` naming the pipeline file by a relative path or a hard link is the file itself."""
    path = tmp_path / "p.svg"
    text = Path(CHAT).read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    os.link(path, tmp_path / "q.svg")
    for out in ("p.svg", "q.svg"):
        r = agp_in("render", path, "-o", out, cwd=tmp_path)
        assert r.returncode == 2 and f"cannot write '{out}': it is the pipeline file {path} itself" in r.stderr
        assert path.read_text(encoding="utf-8") == text


def test_render_dot_needs_no_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "chat.dot"
    assert cli.main(["render", CHAT, "-o", str(out)]) == 0
    text = out.read_text()
    assert "rankdir=LR" in text and '"batch" -> "encode" [label="when full"]' in text
    assert cli.main(["render", CHAT, "-o", str(tmp_path / "chat.svg")]) == 1


def test_render_takes_the_output_format_from_an_upper_case_extension_too(tmp_path):
    out = tmp_path / "CHAT.DOT"
    r = agp_in("render", CHAT, "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("digraph") and '"batch" -> "encode" [label="when full"]' in out.read_text()


def test_render_picks_a_pipeline_by_name(tmp_path):
    out = tmp_path / "c.dot"
    assert cli.main(["render", str(ROOT / "examples" / "compare.agp"), "--pipeline", "chat_greedy_window",
                     "-o", str(out)]) == 0
    assert "pipeline chat_greedy_window" in out.read_text()
    assert cli.main(["render", str(ROOT / "examples" / "compare.agp"), "--pipeline", "nope",
                     "-o", str(out)]) == 2


def test_stages_lists_and_documents_kinds(capsys):
    assert cli.main(["stages"]) == 0
    listing = capsys.readouterr().out
    for kind in ("requests", "dynamic_batch", "encode", "kv_lookup", "generate", "respond"):
        assert kind in listing
    assert cli.main(["stages", "dynamic_batch"]) == 0
    doc = capsys.readouterr().out
    assert "max_batch_size" in doc and "1ms" in doc and "full | timeout" in doc and "efficient=8" in doc
    assert cli.main(["stages", "genrate"]) == 2
    assert "did you mean 'generate'?" in capsys.readouterr().err


def test_stages_shows_an_open_lower_bound_as_open(capsys):
    # top_p = 0 and repetition_penalty = 0 are refused by check: the range must not say [0.0..]
    assert cli.main(["stages", "generate"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "(0.0..1.0]" in rows["top_p"] and "(0.0..2.0]" in rows["repetition_penalty"]
    assert "[0.0..1.0]" in rows["min_p"] and "[-2.0..2.0]" in rows["presence_penalty"]


def test_language_commands_import_no_torch(tmp_path):
    code = ("import sys; from pipeline_dsl import cli; cli.build_parser(['check']).format_help();"
            f"cli.main(['check', {CHAT!r}]); cli.main(['fmt', '--check', {CHAT!r}]); cli.main(['stages']);"
            f"cli.main(['render', {CHAT!r}, '-o', {str(tmp_path / 'c.dot')!r}]);"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr


def test_help_lists_every_command():
    help_text = agp_in("--help").stdout
    for name in ("check", "fmt", "render", "stages", "run", "plan", "bench", "serve"):
        assert name in help_text


def test_lazy_command_is_imported_only_when_invoked(monkeypatch, tmp_path, capsys):
    pkg = tmp_path / "fakecmds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bench.py").write_text(
        "HELP = 'fake bench'\n"
        "def add_arguments(p):\n    p.add_argument('--n', type=int, default=1)\n"
        "def main(args):\n    print('bench', args.n)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    real_import = importlib.import_module
    real_spec = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda n: real_import(n.replace("pipeline_dsl.commands.", "fakecmds.")))
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda n: real_spec(n.replace("pipeline_dsl.commands.", "fakecmds."))
                        if n.startswith("pipeline_dsl.commands.bench") else real_spec(n))
    assert cli.main(["bench", "--n", "3"]) == 0
    assert capsys.readouterr().out == "bench 3\n"


@pytest.mark.parametrize("args, message", [
    (["render", CHAT, "-o", "{tmp}"], "argument -o/--output: '{tmp}' is a folder"),
    (["run", CHAT, "--stats", "{tmp}"], "argument --stats: '{tmp}' is a folder"),
    (["run", CHAT, "--trace", "{tmp}/no/such/t.json"], "argument --trace: cannot write '{tmp}/no/such/t.json': "
                                                       "the folder {tmp}/no/such does not exist"),
    (["bench", CHAT, "-w", "w.jsonl", "--json", "{tmp}"], "argument --json: '{tmp}' is a folder"),
    (["bench", CHAT, "-w", "w.jsonl", "--plot", "{tmp}"], "argument --plot: '{tmp}' is a folder"),
    (["serve", CHAT, "--trace", "{tmp}"], "argument --trace: '{tmp}' is a folder"),
    (["bench", CHAT, "-w", "w.jsonl", "--warmup", "-1"], "argument --warmup/--num-warmups: must be between 0 and"),
    (["bench", CHAT, "-w", "w.jsonl", "--request-timeout", "0"], "argument --request-timeout: must be a positive"),
    (["bench", CHAT, "-w", "w.jsonl", "--request-timeout", "nan"], "argument --request-timeout: must be a positive"),
    (["bench", CHAT, "-w", "w.jsonl", "--duration", "nan"], "argument --duration/-d: must be a positive"),
    (["bench", CHAT, "-w", "w.jsonl", "-n", "100000000000"], "argument --num/--num-prompts/-n: must be between 1 and 10,000,000"),
    (["bench", CHAT, "-w", "w.jsonl", "-c", "x"], "argument --concurrency/--max-concurrency/-c: 'x' is not a whole number"),
])
def test_a_bad_flag_value_is_refused_while_parsing_before_any_work(tmp_path, args, message):
    """A --stats that names a folder used to fail after the whole run, as an internal error; a
    --warmup -1 or --request-timeout 0 was measured as if it made sense (every request an error,
    exit 0); -n 1e11 ran out of memory building the arrivals."""
    r = agp_in(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert message.format(tmp=tmp_path) in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_an_output_on_a_read_only_file_system_says_so_not_permission_denied(tmp_path, monkeypatch):
    """In a container with a read-only root an output outside the writable volumes was refused
    with "permission denied", which sends the deployer to chmod; a read-only file system is now
    named as such (permissions still say permission denied)."""
    import argparse
    import os
    import types

    from pipeline_dsl import cliargs

    flags = {"f_flag": os.ST_RDONLY}
    monkeypatch.setattr(cliargs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(cliargs.os, "statvfs", lambda path: types.SimpleNamespace(**flags))
    out = str(tmp_path / "stats.json")
    with pytest.raises(argparse.ArgumentTypeError, match=f"cannot write '{out}': {tmp_path} is on a read-only file"):
        cliargs.output_file(out)
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path} is on a read-only file system$"):
        cliargs.output_file_or_folders(str(tmp_path / "new" / "graph.svg"))
    flags["f_flag"] = 0
    with pytest.raises(argparse.ArgumentTypeError, match=f"cannot write '{out}': permission denied$"):
        cliargs.output_file(out)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["check", CHAT], ["stages"], ["fmt", CHAT]])
def test_a_full_disk_on_standard_output_is_said_with_exit_1(args):
    """Short output fails only at the interpreter's last flush: that was exit 1 with no word at
    all (check), or an 'internal error' (stages, fmt)."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([*AGP, *args], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == "agp: error: cannot write the output: No space left on device\n"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_commands_that_run_a_pipeline_say_that_dash_is_not_read_from_stdin(command):
    r = agp_in(command, "-", input=(ROOT / "examples" / "chat.agp").read_text())
    assert r.returncode == 2 and "not found" not in r.stderr
    assert f"agp {command}: error: argument FILE: '-' (standard input) is read as a pipeline by check, fmt, plan " \
           "and render only: give the .agp file's path" in r.stderr


def test_check_and_fmt_exit_2_for_a_bad_file_whatever_the_files_after_it(tmp_path):
    """agp check A B: an error in A is exit 2 though B is clean; agp fmt --check: a file that does
    not parse is exit 2 though another only needs reformatting (1); agp fmt --write leaves a file
    already in canonical layout untouched and unmentioned."""

    good = tmp_path / "good.agp"
    good.write_text((ROOT / "examples" / "chat.agp").read_text())
    bad, messy = tmp_path / "bad.agp", tmp_path / "messy.agp"
    bad.write_text("pipeline p {\n")
    messy.write_text(good.read_text().replace("    stage", "  stage", 1))
    r = agp_in("check", bad, good)
    assert r.returncode == 2 and f"{good}: ok" in r.stdout
    assert agp_in("fmt", "--check", bad, messy).returncode == 2
    assert agp_in("fmt", "--check", messy).returncode == 1
    formatted = agp_in("fmt", good).stdout
    good.write_text(formatted)
    before = good.stat().st_mtime_ns
    r = agp_in("fmt", "--write", good)
    assert (r.returncode, r.stdout, good.stat().st_mtime_ns) == (0, "", before)


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/PID/syscall (Linux)")
def test_ctrl_c_while_agp_check_waits_for_its_input_exits_130_without_a_traceback():
    """`agp check -` waiting on a pipe that has not ended yet, stopped by Ctrl-C: exit 130
    (128 + SIGINT), as a shell expects of an interrupted tool, and no traceback."""
    import platform
    import signal
    import time

    read = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())     # the read system call's number
    if read is None:
        pytest.skip(f"the read system call's number on {platform.machine()} is not known here")
    proc = subprocess.Popen([*AGP, "check", "-"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    try:
        deadline = time.monotonic() + 120
        while True:                       # until it waits in a read of standard input (fd 0)
            try:
                call = Path(f"/proc/{proc.pid}/syscall").read_text().split()
            except PermissionError:
                pytest.skip("/proc/PID/syscall is not readable here")
            except OSError:
                call = []
            if call[:2] == [read, "0x0"]:
                break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_check_json_of_a_file_with_warnings_alone_is_ok():
    """Warnings do not fail a check: `--json` says ok (a CI step reads it) and the exit status is 0."""
    r = agp_in("check", "--json", "examples/errors/unused_setting.agp")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["ok"] is True
    assert data["diagnostics"] and {d["severity"] for d in data["diagnostics"]} == {"warning"}


def test_check_reports_every_file_after_one_it_cannot_read(tmp_path):
    """agp check reports every error of every file: a file that cannot be read (standard input
    that is not UTF-8, a file that is missing) is one, and the files after it are still checked."""
    r = agp_in("check", "-", "examples/chat.agp", input="pipeline p \xff {}\n", encoding="latin-1")
    assert r.returncode == 2 and r.stderr.startswith("<stdin>:1:12: error: file is not valid UTF-8")
    assert "examples/chat.agp: ok (1 pipeline)" in r.stdout
    missing = tmp_path / "missing.agp"
    r = agp_in("check", missing, "examples/chat.agp")
    assert r.returncode == 2 and str(missing) in r.stderr
    assert "examples/chat.agp: ok (1 pipeline)" in r.stdout
    data = json.loads(agp_in("check", "--json", missing, "examples/errors/cycle.agp").stdout)
    assert data["ok"] is False and any("cycle" in d["message"] for d in data["diagnostics"])


def test_fmt_reads_a_files_crlf_line_breaks_as_an_editor_shows_them(tmp_path):
    """A file saved with Windows line breaks formats to the same text as with "\\n" ones: no "\\r"
    left at the end of a comment, and a file already in layout but for its line breaks is not
    said to need reformatting."""
    text = (ROOT / "examples" / "chat.agp").read_text()
    assert "#" in text
    crlf = tmp_path / "crlf.agp"
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    r = agp_in("fmt", crlf)
    assert r.returncode == 0 and r.stdout == text and "\r" not in r.stdout
    assert agp_in("fmt", "--check", crlf).returncode == 0


def test_agp_without_a_command_prints_its_usage_and_exits_2():
    """`agp` alone is a user error, as argparse's missing command is: its usage on stderr, exit 2."""
    r = agp_in()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: agp") and "check" in r.stderr


def test_vllms_long_prefill_threshold_flag_names_the_dynamic_batch_parameter(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "examples/chat.agp", "--long-prefill-token-threshold", "512"])
    assert e.value.code == 2
    assert ("--long-prefill-token-threshold is vLLM's: long prompts leave room for short ones by "
            "dynamic_batch's `long_prefill_threshold`") in capsys.readouterr().err


def test_the_agp_process_ends_with_its_heap_frozen_and_main_in_a_process_that_goes_on_does_not():
    """The interpreter's last collections at exit would walk and free every object the process
    loaded (a model's ~300k: ~0.6 s of CPU an `agp run`) just before the system frees it all:
    `agp` (the console script and python -m pipeline_dsl.cli) freezes the heap once main() has
    returned, and its atexit handlers still run. main() called in a process that goes on
    freezes nothing: that process keeps collecting its garbage."""
    import gc
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agp"] == "pipeline_dsl.cli:entry"
    code = ("import atexit, gc, runpy, sys\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count(), flush=True))\n"
            "sys.argv = ['agp', 'check', sys.argv[1]]\n"
            "runpy.run_module('pipeline_dsl.cli', run_name='__main__', alter_sys=True)\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "chat.agp")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    frozen = int(out.stdout.split("frozen ")[1].split()[0])
    assert frozen > 10_000, out.stdout[-500:]                    # the heap, not a handful of objects
    before = gc.get_freeze_count()
    assert agp_in("check", ROOT / "examples" / "chat.agp").returncode == 0
    assert gc.get_freeze_count() == before


@pytest.mark.parametrize("flag", ["--max-lora-rank=64", "--max-loras=4", "--max-cpu-loras=8", "--lora-dtype=bfloat16",
                                  "--fully-sharded-loras", "--lora-extra-vocab-size=256"])
def test_vllms_lora_sizes_are_refused_saying_agp_sizes_adapters_from_their_files(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "examples/chat.agp", "--enable-lora", flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag.split('=')[0]} is vLLM's: agp sizes each LoRA adapter from its files" in err, err
