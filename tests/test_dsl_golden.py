"""Golden diagnostics: every examples/errors/NAME.agp prints exactly NAME.expected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import pipeline_dsl
from clikit import agp_in
from pipeline_dsl.diagnostics import has_errors, render_all

ROOT = Path(__file__).resolve().parents[1]
ERRORS = sorted((ROOT / "examples" / "errors").glob("*.agp"))
EXAMPLES = sorted((ROOT / "examples").glob("*.agp"))


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def check_output(rel: str) -> tuple[str, list]:
    program, diags = pipeline_dsl.load(rel)
    return render_all(diags, program.sources), diags


def test_every_error_class_has_an_example():
    names = {p.stem for p in ERRORS}
    for cls in ("syntax_error", "unknown_kind", "unknown_parameter", "missing_parameter", "ill_typed_parameter",
                "out_of_range", "wrong_unit", "duplicate_stage", "undefined_stage", "cycle", "unreachable_stage",
                "no_path_to_respond", "port_mismatch", "no_request_source", "include_not_found",
                "include_cycle", "not_utf8", "unused_setting", "derived"):
        assert cls in names


@pytest.mark.parametrize("path", ERRORS, ids=lambda p: p.stem)
def test_error_example_prints_its_expected_diagnostics(path):
    rel = os.path.relpath(path, ROOT)
    out, diags = check_output(rel)
    expected = path.with_suffix(".expected").read_text(encoding="utf-8")
    assert out == expected
    # every diagnostic points into a file, and the file is the one that has the problem
    assert all(d.pos is not None and d.pos.line >= 1 and d.pos.col >= 1 for d in diags)


@pytest.mark.parametrize("path", ERRORS, ids=lambda p: p.stem)
def test_error_examples_fail_and_warnings_do_not(path):
    _, diags = check_output(os.path.relpath(path, ROOT))
    if path.stem == "unused_setting":
        assert diags and not has_errors(diags)
        assert all(d.severity == "warning" for d in diags)
    else:
        assert has_errors(diags)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_clean(path):
    _, diags = check_output(os.path.relpath(path, ROOT))
    assert diags == []


def test_cli_check_stderr_equals_the_golden_file():
    rel = "examples/errors/unknown_kind.agp"
    proc = agp_in("check", rel)
    assert proc.returncode == 2
    assert proc.stderr == (ROOT / "examples/errors/unknown_kind.expected").read_text(encoding="utf-8")
