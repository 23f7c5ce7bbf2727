"""What a user of llama.cpp's llama-server or of Ollama brings to `agp serve`: their flags
(-c, --n-predict, --parallel, -hf, --keep, --chat-template chatml), their request fields
(n_predict, cache_prompt, grammar, json_schema, n_probs, Ollama's options) and their routes
(/completion, /props, /slots, /api/chat, /api/tags). agp takes OpenAI's and vLLM's names; each of
those is refused as an unknown one is (exit 2, a 400, a 404), and the message says where agp's
equivalent is (docs/serve.md and docs/openai.md, "Coming from llama.cpp or Ollama")."""
from __future__ import annotations

import pytest

from pipeline_dsl import cli
from pipeline_dsl.commands import serve as serve_command


# ---------------------------------------------------------------- llama-server's flags

@pytest.fixture
def no_serving(monkeypatch):
    """agp serve's main replaced: a command line that gets past the parser serves nothing."""
    monkeypatch.setattr(serve_command, "main", lambda args: 0)


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["-c", "2048", "-np", "4"],
     ["unrecognized arguments: -c 2048 -np 4; ",
      "-c is llama.cpp's: agp's is --max-model-len N, each sequence's context (llama.cpp splits -c among its "
      "--parallel slots",
      "-np is llama.cpp's: agp's is --max-num-seqs N"]),
    (["--ctx-size=4096", "--n-predict", "64", "--parallel", "2"],
     ["--ctx-size is llama.cpp's: agp's is --max-model-len N",
      "--n-predict is llama.cpp's: a request's `max_tokens` sets it; the server's default is the generate stage's "
      "`max_new_tokens` (--override-generation-config '{\"max_new_tokens\": N}')",
      "--parallel is llama.cpp's: agp's is --max-num-seqs N"]),
    (["-ngl", "99", "--jinja", "-a", "mine"],
     ["-ngl is llama.cpp's: agp runs the whole model on the pipeline's `device`",
      "--jinja is llama.cpp's: agp always applies the model's Jinja chat template",
      "-a is llama.cpp's: agp's is --served-model-name NAME"]),
])
def test_llama_servers_flags_say_what_agp_serve_takes_instead(argv, said, no_serving, capsys):
    """They were refused as any unknown flag is, `unrecognized arguments: -c 2048`, with nothing on
    agp's --max-model-len or --max-num-seqs."""
    err = refused(["serve", "examples/chat.agp", *argv], capsys)
    for line in said:
        assert line in err, err


@pytest.mark.parametrize("argv, flag", [
    (["--keep", "5"], "--keep"),                 # llama.cpp's tokens kept on a context shift
    (["-hf", "org/model-GGUF"], "-hf"),          # llama.cpp's Hugging Face download
])
def test_a_llama_server_flag_is_not_misread_as_one_of_agps(argv, flag, no_serving, capsys):
    """argparse took llama.cpp's --keep 5 as an abbreviation of --keep-alive-timeout (the server
    started, closing idle connections after 5 s), and -hf as -h with the value 'f' ('ignored explicit
    argument'): both are refused as unknown, saying what they are."""
    err = refused(["serve", "examples/chat.agp", *argv], capsys)
    assert f"unrecognized arguments: {flag}; {flag} is llama.cpp's: " in err, err


def test_agp_run_names_no_serve_flag_for_llama_cpps(capsys):
    """agp run has no --max-model-len: a hint there would send the user to a flag it refuses."""
    err = refused(["run", "examples/chat.agp", "-c", "2048"], capsys)
    assert "unrecognized arguments: -c 2048" in err and "llama.cpp" not in err, err


def test_a_chat_template_given_by_name_is_told_agp_takes_a_template(capsys):
    """llama.cpp's --chat-template takes a built-in's name (chatml, llama3); agp said only
    'chatml: no such file'."""
    assert cli.main(["serve", "examples/chat.agp", "--port", "0", "--chat-template", "chatml"]) == 2
    err = capsys.readouterr().err
    assert ("--chat-template chatml: no such file (agp knows no templates by name, as llama.cpp knows 'chatml' or "
            "'llama3': give a Jinja template's file or the template itself; left out, the model's own template") in err
    # a path that is not there is still just that
    assert cli.main(["serve", "examples/chat.agp", "--port", "0", "--chat-template", "t/none.jinja"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template t/none.jinja: no such file" in err and "by name" not in err, err
