"""What `agp check` reads and runs (docs/language.md, "What agp reads and runs"): it never
imports or executes a module (functions are found by reading source, parent packages
included), never quotes a file that is not an .agp source, and reads included .agp files and
json_schema files only inside the pipeline's folder unless --allow-path allows another."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_dsl
from clikit import agp_in
from pipeline_dsl.userfn import FunctionNotFound, function_info

ROOT = Path(__file__).resolve().parents[1]
SECRET = "TOPSECRET-4711"

PIPELINE = """pipeline p {{
    stage request : requests {{}}
    stage batch   : dynamic_batch {{}}
    stage encode  : encode {{}}
    stage kv      : kv_lookup {{}}
    stage gen     : generate {{ {gen} }}
    stage out     : respond {{}}
{extra}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> {after}
}}
"""


def pipeline(gen: str = "", fn: str | None = None, uses: str = "") -> str:
    extra = f'    stage hook : python {{ fn = "{fn}" }}\n    hook -> out' if fn else ""
    return uses + PIPELINE.format(gen=gen, extra=extra, after="hook" if fn else "out")


def check(path: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "check", str(path), *flags],
                          capture_output=True, text=True, cwd=path.parent, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def tree(tmp_path):
    """tmp/app/p.agp (the pipeline's folder) beside tmp/outside/ (another folder with secrets)."""
    app, outside = tmp_path / "app", tmp_path / "outside"
    app.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(f"{SECRET}\n")
    (outside / "secret.agp").write_text(f"{SECRET} is not a pipeline\n")
    (outside / "lib.agp").write_text(pipeline().replace("pipeline p", "pipeline q"))
    return app, outside


def test_use_never_reads_a_file_outside_the_folder_or_one_that_is_not_agp(tree):
    app, outside = tree
    os.symlink(outside / "secret.agp", app / "link.agp")
    uses = "".join(f'use "{u}"\n' for u in (outside / "secret.txt", "/proc/self/environ", "/etc/passwd",
                                            "../outside/secret.agp", "link.agp"))
    (app / "p.agp").write_text(pipeline(uses=uses))
    r = check(app / "p.agp", env={"AGP_SECRET_VAR": SECRET})
    assert r.returncode == 2
    assert SECRET not in r.stderr and "root:" not in r.stderr, r.stderr
    assert r.stderr.count("is not an .agp file") == 3 and r.stderr.count("outside the pipeline's folder") == 2
    assert "p.agp:1:5: error" in r.stderr and "p.agp:5:5: error" in r.stderr      # at each use


def test_a_folder_whose_name_starts_with_the_pipelines_folder_name_is_outside_it(tree):
    app, outside = tree
    beside = app.parent / (app.name + "2")          # tmp/app2 is not inside tmp/app
    beside.mkdir()
    (beside / "lib.agp").write_text(f"{SECRET} is not a pipeline\n")
    (app / "p.agp").write_text(pipeline(uses='use "../app2/lib.agp"\n'))
    program, diags = pipeline_dsl.load(app / "p.agp")
    (d,) = diags
    assert d.message == "include '../app2/lib.agp' is outside the pipeline's folder" and d.pos.line == 1
    assert program.pipeline_names() == ["p"] and SECRET not in "".join(program.sources.values())


def test_a_link_named_agp_to_a_file_that_is_not_agp_is_refused_before_it_is_read(tree):
    app, _ = tree
    (app / "notes.txt").write_text(f"{SECRET}\n")
    os.symlink(app / "notes.txt", app / "notes.agp")
    (app / "p.agp").write_text(pipeline(uses='use "notes.agp"\n'))
    program, diags = pipeline_dsl.load(app / "p.agp")
    (d,) = diags
    assert d.message == "include 'notes.agp' is not an .agp file" and d.pos.line == 1
    assert SECRET not in "".join(program.sources.values())


def test_allow_path_lets_use_read_another_folder(tree):
    app, outside = tree
    (app / "p.agp").write_text(pipeline(uses='use "../outside/lib.agp"\n'))
    assert "outside the pipeline's folder" in check(app / "p.agp").stderr
    r = check(app / "p.agp", "--allow-path", str(outside))
    assert r.returncode == 0, r.stderr
    program, diags = pipeline_dsl.load(app / "p.agp", allow_paths=[outside])
    assert diags == [] and sorted(program.pipeline_names()) == ["p", "q"]


def test_check_never_imports_a_module_or_its_parent_packages(tree, tmp_path):
    """`this` prints the Zen of Python when imported; a package on sys.path whose __init__ leaves
    a mark must not leave it: the function is found in its module's source."""
    app, _ = tree
    lib = tmp_path / "lib"
    (lib / "loud").mkdir(parents=True)
    mark = tmp_path / "imported"
    (lib / "loud" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').write('x')\n")
    (lib / "loud" / "hooks.py").write_text(f"open({str(mark)!r}, 'w').write('x')\n\ndef redact(item):\n"
                                           "    return item\n")
    (app / "p.agp").write_text(pipeline(fn="this.x:f"))
    r = check(app / "p.agp")
    assert r.returncode == 2 and "Zen of Python" not in r.stdout + r.stderr
    assert "module 'this' is not a package" in r.stderr
    (app / "p.agp").write_text(pipeline(fn="loud.hooks:redact"))
    r = check(app / "p.agp", env={"PYTHONPATH": f"{ROOT}{os.pathsep}{lib}"})
    assert r.returncode == 0, r.stderr
    assert not mark.exists()
    (app / "p.agp").write_text(pipeline(fn="loud.hooks:redcat"))
    r = check(app / "p.agp", env={"PYTHONPATH": f"{ROOT}{os.pathsep}{lib}"})
    assert r.returncode == 2 and "did you mean 'redact'" in r.stderr and not mark.exists()


def test_function_info_gives_the_defining_node_without_importing(tmp_path):
    (tmp_path / "hooks.py").write_text("raise SystemExit('imported!')\n\nasync def a(item):\n    return item\n\n"
                                       "def g(item):\n    yield item\n")
    info = function_info("hooks:a", str(tmp_path))
    assert info.path == str(tmp_path / "hooks.py") and type(info.node).__name__ == "AsyncFunctionDef"
    assert type(function_info("hooks:g", str(tmp_path)).node).__name__ == "FunctionDef"
    assert function_info("math:sqrt", None).node is None                # the stdlib's C module: imported
    with pytest.raises(FunctionNotFound, match="has no function 'b'"):
        function_info("hooks:b", str(tmp_path))


def test_json_schema_files_stay_inside_the_folder_are_bounded_and_never_quoted(tree):
    pytest.importorskip("llguidance")
    app, outside = tree
    (outside / "s.json").write_text('{"type": "object"}')
    cases = {
        "../outside/s.json": "outside the pipeline's folder",
        "big.json": "is too large (256 MiB)",
        "deep.json": "is nested too deeply",
        "bad.json": "is not JSON",
    }
    with open(app / "big.json", "wb") as f:
        f.truncate(256 << 20)                                   # sparse: nothing to read
    (app / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (app / "bad.json").write_text(f"{{{SECRET}: 1}}")
    for path, words in cases.items():
        (app / "p.agp").write_text(pipeline(gen=f'json_schema = "{path}"'))
        r = agp_in("check", app / "p.agp", cwd=app)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (path, r.stderr)
        assert SECRET not in r.stderr and "p.agp:6:" in r.stderr
    (app / "p.agp").write_text(pipeline(gen='json_schema = "../outside/s.json"'))
    assert agp_in("check", app / "p.agp", "--allow-path", outside, cwd=app).returncode == 0


def test_agp_run_reads_json_schema_outside_the_folder_only_when_allowed(tree, tiny_gguf):
    pytest.importorskip("llguidance")
    app, outside = tree
    (outside / "s.json").write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                "required": ["a"]}))
    (app / "p.agp").write_text(pipeline(gen=f'json_schema = "../outside/s.json"  model = "{tiny_gguf}"  '
                                            'max_new_tokens = 8'))
    (app / "in.jsonl").write_text('{"prompt": "hi"}\n')
    base = ["run", app / "p.agp", "-i", app / "in.jsonl", "--no-progress", "--threads", "1"]
    r = agp_in(*base, cwd=app)
    assert r.returncode == 2 and "outside the pipeline's folder" in r.stderr
    r = agp_in(*base, "--allow-path", outside, cwd=app)
    assert r.returncode == 0, r.stderr


def test_json_schema_through_a_link_a_sibling_folder_or_an_absolute_path_is_refused_unread(tree):
    """The same rule as `use`: a link resolved out of the folder, a folder whose name merely
    starts with the pipeline folder's, an absolute path and `..` are outside it; a directory or a
    FIFO is no file (never opened: a FIFO would block the read)."""
    pytest.importorskip("llguidance")
    app, outside = tree
    beside = app.parent / (app.name + "2")
    beside.mkdir()
    for folder in (outside, beside):
        (folder / "s.json").write_text(f'{{"type": "object", "description": "{SECRET}"}}')
    os.symlink(outside / "s.json", app / "link.json")
    os.symlink(beside, app / "sub")
    (app / "dir.json").mkdir()
    os.mkfifo(app / "fifo.json")
    out = "is outside the pipeline's folder"
    cases = {"link.json": out, "sub/s.json": out, "../app2/s.json": out, "./../outside/s.json": out,
             str(outside / "s.json"): out, "dir.json": "'dir.json' is a directory", "fifo.json": "'fifo.json' is not a regular file"}
    for path, words in cases.items():
        (app / "p.agp").write_text(pipeline(gen=f'json_schema = "{path}"'))
        program, diags = pipeline_dsl.load(app / "p.agp")
        assert [d.pos.line for d in diags] == [6] and words in diags[0].message, (path, diags)
        assert SECRET not in diags[0].message + str(diags[0].hint), path
    (app / "p.agp").write_text(pipeline(gen='json_schema = "link.json"'))
    assert pipeline_dsl.load(app / "p.agp", allow_paths=[outside])[1] == []


def test_a_use_without_its_agp_suffix_is_told_the_file_only_inside_the_allowed_folders(tree):
    """`use "lib"` beside a lib.agp is told to write "lib.agp"; a name outside the allowed folders
    gets no such hint, so a check tells nothing of what files exist there."""
    app, outside = tree
    (app / "lib.agp").write_text(pipeline().replace("pipeline p", "pipeline q"))
    (app / "p.agp").write_text(pipeline(uses='use "lib"\nuse "../outside/lib"\n'))
    _, diags = pipeline_dsl.load(app / "p.agp")
    inside, beyond = diags
    assert inside.message == "include 'lib' is not an .agp file" and inside.hint == 'write use "lib.agp"'
    assert beyond.message == "include '../outside/lib' is not an .agp file"
    assert beyond.hint == "only .agp files can be included"
