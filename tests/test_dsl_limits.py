"""Hostile `.agp` input: every family gives positioned diagnostics, never an exception.

Families: includes of devices, FIFOs and directories; include chains 1,000 files deep, wide
include trees, include cycles through many files; files over the size cap; huge lists, deep
nesting, thousands of parameters, stages, arrows and pipelines; very long lines. `check` and `fmt`
do linear work, counted in calls (bench/check_scaling.py prints the curve in seconds up to 20,000).
"""

from __future__ import annotations

import cProfile
import difflib
import os
import pstats
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_dsl
from pipeline_dsl import loader, parser
from pipeline_dsl.diagnostics import Suggestions, render_all

from clikit import agp_in

ROOT = Path(__file__).resolve().parents[1]
POSITIONED = re.compile(r"^[^\s:][^:]*:\d+:\d+: (error|warning): ")

VALID_TAIL = ("    stage batch : dynamic_batch\n    stage encode : encode\n    stage kv : kv_lookup\n"
              "    stage gen : generate\n    stage out : respond\n"
              "    batch -> encode when full\n    batch -> encode when timeout\n    encode -> kv -> gen -> out\n")


def small_pipeline(name: str) -> str:
    return f"pipeline {name} {{\n    stage request : requests\n{VALID_TAIL}    request -> batch\n}}\n"


def chain_of(n: int, last: str = "batch") -> str:
    """A pipeline whose request source runs through n route stages, in one chain statement."""
    stages = "".join(f"    stage s{i} : route\n" for i in range(n))
    arrows = " -> ".join(f"s{i}" for i in range(n))
    return ("pipeline p {\n    stage request : requests\n" + stages + VALID_TAIL
            + f"    request -> {arrows}" + (f" -> {last}" if last else "") + "\n}\n")


def load(path) -> list:
    """Load `path`; assert no exception escapes and that every diagnostic has a position."""
    program, diags = pipeline_dsl.load(str(path))
    assert_positioned(diags)
    out = render_all(diags, program.sources)
    assert "internal error" not in out
    return diags


def loads(text: str, file: str = "t.agp") -> list:
    program, diags = pipeline_dsl.loads(text, file)
    assert_positioned(diags)
    render_all(diags, program.sources)
    return diags


def assert_positioned(diags) -> None:
    for d in diags:
        assert d.pos is not None, d.message[:200]
        assert d.pos.file and d.pos.line >= 1 and d.pos.col >= 1, d


def errors(diags) -> list:
    return [d for d in diags if d.is_error]


def cli_check(path, cwd=None, child: bool = True) -> str:
    """`agp check FILE`'s stderr; every error line starts with file:line:col. In a child process
    where a hang must be a timeout, not a stuck run; in this one (`child=False`) where the work
    is bounded by the checks before it."""
    if child:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-m", "pipeline_dsl.cli", "check", str(path)], cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=300, env=env)
    else:
        proc = agp_in("check", path, cwd=cwd or ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    heads = [ln for ln in proc.stderr.splitlines() if "error:" in ln and not ln.startswith(" ")]
    assert heads and all(POSITIONED.match(ln) for ln in heads), [ln for ln in heads if not POSITIONED.match(ln)][:3]
    return proc.stderr


# ---------------------------------------------------------------- devices, FIFOs, directories

@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom"])
def test_use_of_a_device_is_an_error_at_the_use_and_reads_nothing(tmp_path, target):
    if not os.path.exists(target):
        pytest.skip(f"no {target} here")
    (tmp_path / "m.agp").write_text(f'# devices\nuse "{target}"\n' + small_pipeline("p"))
    (d,) = load(tmp_path / "m.agp")
    assert "is not an .agp file" in d.message                # refused before it is looked at
    assert (d.pos.file, d.pos.line, d.pos.col) == (str(tmp_path / "m.agp"), 2, 5)


def test_use_of_a_fifo_or_a_directory_is_an_error_and_does_not_block(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.agp")                 # opening it for reading would wait for a writer
    (tmp_path / "dir.agp").mkdir()
    (tmp_path / "m.agp").write_text('use "pipe.agp"\nuse "dir.agp"\n' + small_pipeline("p"))
    out = cli_check("m.agp", cwd=tmp_path)           # in a subprocess: a hang is a timeout, not a stuck run
    assert "m.agp:1:5: error: 'pipe.agp' is a FIFO (named pipe), not a regular file" in out
    assert "m.agp:2:5: error: 'dir.agp' is a directory, not a file" in out
    diags = load(tmp_path / "m.agp")
    assert [d.pos.line for d in diags] == [1, 2]


def test_checking_a_device_or_a_missing_file_is_an_error_at_its_first_line(tmp_path):
    for path, words in (("/dev/zero", "character device"), (str(tmp_path / "none.agp"), "not found"),
                        (str(tmp_path), "is a directory")):
        if not os.path.exists(path) and "not found" not in words:
            continue
        (d,) = load(path)
        assert words in d.message and (d.pos.line, d.pos.col) == (1, 1)


def test_a_nul_or_a_huge_include_path_is_an_error_at_the_use(tmp_path):
    (tmp_path / "m.agp").write_text('use "a\\0b"\nuse "' + "x" * 100_000 + '"\n')
    d1, d2 = load(tmp_path / "m.agp")
    assert "NUL" in d1.message and "a\\x00b" in d1.message and d1.pos.line == 1
    assert d2.pos.line == 2 and len(d2.message) < 500


# ---------------------------------------------------------------- include trees

def test_include_chain_1000_files_deep_stops_at_the_depth_cap(tmp_path):
    n = 1000
    for i in range(n):
        (tmp_path / f"f{i}.agp").write_text(f'use "f{i + 1}.agp"\n' if i + 1 < n else small_pipeline("p"))
    (d,) = load(tmp_path / "f0.agp")
    depth = loader.MAX_INCLUDE_DEPTH
    assert d.message.startswith("includes nested too deeply") and f"file {depth + 1} " in d.message
    assert d.pos.file.endswith(f"f{depth - 1}.agp") and (d.pos.line, d.pos.col) == (1, 5)
    out = cli_check("f0.agp", cwd=tmp_path, child=False)
    assert out.count("error:") == 1


def test_include_chain_at_the_depth_cap_loads(tmp_path):
    n = loader.MAX_INCLUDE_DEPTH
    for i in range(n):
        (tmp_path / f"f{i}.agp").write_text(f'use "f{i + 1}.agp"\n' if i + 1 < n else small_pipeline("p"))
    program, diags = pipeline_dsl.load(str(tmp_path / "f0.agp"))
    assert diags == [] and program.pipeline_names() == ["p"]


def test_include_cycle_through_many_files_is_one_error(tmp_path):
    n = 50
    for i in range(n):
        (tmp_path / f"c{i}.agp").write_text(f'use "c{(i + 1) % n}.agp"\n')
    (d,) = load(tmp_path / "c0.agp")
    assert d.message.startswith("include cycle:") and d.message.count("->") == n
    assert d.pos.file.endswith(f"c{n - 1}.agp")


def test_wide_include_tree_loads_each_file_once(tmp_path):
    (tmp_path / "leaves").mkdir()
    for i in range(200):
        (tmp_path / "leaves" / f"l{i}.agp").write_text(small_pipeline(f"p{i}"))
    uses = "".join(f'use "leaves/l{i}.agp"\n' for i in range(200))
    (tmp_path / "root.agp").write_text(uses + uses)        # each twice: loaded once
    program, diags = pipeline_dsl.load(str(tmp_path / "root.agp"))
    assert diags == [] and len(program.pipelines) == 200


def test_a_program_of_more_than_max_files_is_one_error_at_the_use_past_it(tmp_path):
    n = loader.MAX_FILES + 200
    for i in range(n):
        (tmp_path / f"l{i}.agp").write_text(f"# leaf {i}\n")
    (tmp_path / "root.agp").write_text("".join(f'use "l{i}.agp"\n' for i in range(n)))
    (d,) = load(tmp_path / "root.agp")
    assert d.message.startswith("too many files") and d.pos.line == loader.MAX_FILES   # the root is file 1


# ---------------------------------------------------------------- sizes

def test_a_file_over_the_size_cap_is_an_error_at_the_use_or_at_its_first_line(tmp_path):
    big = tmp_path / "big.agp"
    big.write_text("# filler\n" * (loader.MAX_FILE_BYTES // 9 + 10))
    (tmp_path / "m.agp").write_text('use "big.agp"\n' + small_pipeline("p"))
    (d,) = load(tmp_path / "m.agp")
    assert "too large" in d.message and d.pos.file.endswith("m.agp") and d.pos.line == 1
    (d,) = load(big)
    assert "too large" in d.message and (d.pos.file, d.pos.line, d.pos.col) == (str(big), 1, 1)
    (d,) = loads("#" * (loader.MAX_FILE_BYTES + 1))
    assert "too large" in d.message and (d.pos.line, d.pos.col) == (1, 1)


def test_a_file_of_exactly_the_size_cap_is_read(tmp_path):
    """The cap is the largest size allowed: MAX_FILE_BYTES bytes load, one byte more does not."""
    text = small_pipeline("p")
    pad = loader.MAX_FILE_BYTES - len(text.encode()) - 1
    exact = tmp_path / "exact.agp"
    exact.write_text(text + "#" * pad + "\n")
    assert exact.stat().st_size == loader.MAX_FILE_BYTES and load(exact) == []
    (tmp_path / "m.agp").write_text('use "exact.agp"\n')
    assert load(tmp_path / "m.agp") == []
    exact.write_text(text + "#" * (pad + 1) + "\n")
    (d,) = load(exact)
    assert "too large" in d.message


def test_a_program_over_the_total_size_cap_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "MAX_PROGRAM_BYTES", 4000)
    for i in range(10):
        (tmp_path / f"l{i}.agp").write_text("#" * 999 + "\n")
    (tmp_path / "root.agp").write_text("".join(f'use "l{i}.agp"\n' for i in range(10)))
    (d,) = load(tmp_path / "root.agp")
    assert d.message.startswith("the program is too large") and d.pos.line == 4


LONG_NAME = "x" * 900_000
EDGES = "a -> b when full " * 20_000          # 20,000 edges with a condition on one line


@pytest.mark.parametrize("text, message, where", [
    # a syntax error after a 900,000-character name: the token before the error was searched for
    # from every offset of the text, each reading the name to its end (hours)
    (f"pipeline p {{\n stage {LONG_NAME} : route }}\n stage = 1\n}}\n", "unexpected 'stage'", (3, 2)),
    (f"pipeline p {{\n stage {LONG_NAME} : route {{ }} -> c\n}}\n", "unexpected '->'", (2, 900_021)),
    # an error on the line after a long line of conditions: a hint's pattern was tried from each
    # 'when' of the earlier line, each reading to that line's end (minutes)
    (f"pipeline p {{\n{EDGES}\na -> b when full -> c\n}}\n", "unexpected '->'", (3, 18)),
    (f"pipeline p {{\n{EDGES}\n x \"s\"\n}}\n", "unexpected string", (3, 4)),
])
def test_a_syntax_error_after_a_long_name_or_line_is_reported(tmp_path, text, message, where):
    """Each file is under the size cap and its syntax error is found in one parse; working out
    the hint around it reads the text a bounded number of times (each was quadratic in the
    long name or line). In a subprocess: a hang is a timeout, not a stuck run."""
    f = tmp_path / "long.agp"
    f.write_text(text)
    assert f.stat().st_size < loader.MAX_FILE_BYTES
    out = cli_check(f)
    head = out.splitlines()[0]
    assert head.startswith(f"{f}:{where[0]}:{where[1]}: error: {message}"), head[:300]
    assert len(out) < 5000


def test_the_block_left_open_before_an_error_is_named_without_lexing_the_text_again():
    """`stage t` after a stage's 500 parameters on one line, its '}' forgotten: the hint names
    the '{' left open, found by a scan of the braces and a lex of the few tokens before it (the
    text before the error was lexed again, whole: half a parse more). Counted in calls against
    the same file with its '}'."""
    params = " ".join(f"x{i} = {i}" for i in range(500))
    closed = f"pipeline p {{\n  stage s : route {{\n    {params}\n  }}\n  stage t : route\n}}\n"
    unclosed = closed.replace("\n  }\n", "\n\n")
    (d,) = parser.parse(unclosed, "t.agp")[1]
    assert (d.message, d.pos.line, d.expected, d.hint) == (
        "unexpected 'stage'", 5, "'}' to close stage 's' first", "the '{' of stage 's' (line 2) is not closed")
    assert parser.parse(closed, "t.agp")[1] == []
    good, bad = calls(parser.parse, closed, "t.agp"), calls(parser.parse, unclosed, "t.agp")
    assert bad - good < good / 10, f"{good} calls with the '}}', {bad} without"


def test_huge_list_long_string_and_long_line_are_checked_and_rendered_briefly(tmp_path):
    diags = loads(small_pipeline("p").replace("stage gen : generate",
                                              "stage gen : generate { stop = [" + ", ".join(['"a"'] * 50_000) + "] }"))
    (d,) = errors(diags)
    assert "at most" in d.message and d.pos.line == 6
    f = tmp_path / "long.agp"
    f.write_text(small_pipeline("p").replace("stage out : respond", 'stage out : respond { x = "' + "y" * 500_000
                                             + '" }'))
    (d,) = load(f)
    assert d.message.startswith("unknown parameter 'x'")
    out = cli_check(f, child=False)
    assert len(out) < 5000                          # the 500,000-character line is shown as a window


# ---------------------------------------------------------------- nesting

@pytest.mark.parametrize("depth", [30_000, parser.MAX_NESTING + 1])
def test_deeply_nested_lists_are_an_error_at_the_outer_bracket(depth):
    (d,) = loads(f"pipeline p {{\n  stage s : respond {{ x = {'[' * depth}{']' * depth} }}\n}}\n")
    assert d.message == f"values are nested too deeply: {depth} levels" and (d.pos.line, d.pos.col) == (2, 27)


def test_lists_nested_up_to_the_cap_are_fine():
    n = parser.MAX_NESTING
    diags = loads(f"pipeline p {{\n  stage s : respond {{ x = {'[' * n}{']' * n} }}\n}}\n")
    assert not any("nested" in d.message for d in diags)


@pytest.mark.parametrize("cond, col", [("not " * 30_000 + "full", 15),
                                       ("(full and (timeout or " * 5_000 + "full" + "))" * 5_000, 16),
                                       # 70 levels, under the scan's bound: the nest starts at its first '('
                                       ("(" * 70 + "full" + " and timeout) or timeout)" * 35 + " and full", 15),
                                       ("(  " + "not " * 300 + "full)", 18)])          # at the `not`, past blanks
def test_deeply_nested_conditions_are_an_error_at_the_condition(cond, col):
    (d,) = loads(f"pipeline p {{\n  a -> b when {cond}\n}}\n")
    assert d.message.startswith("conditions are nested too deeply") and (d.pos.line, d.pos.col) == (2, col)


def test_10000_ors_are_one_flat_condition():
    cond = " or ".join(f"metadata.k{i} == 1" for i in range(10_000))
    diags = loads(small_pipeline("p").replace("    request -> batch\n", f"    request -> batch when {cond}\n"))
    assert [d.message for d in errors(diags)] == [
        "an item of 'request' that matches none of its conditions has nowhere to go "
        "(no unconditional edge and no `otherwise`)"]


# ---------------------------------------------------------------- 2,000 of a kind

def params_text(n: int) -> str:
    return small_pipeline("p").replace("stage out : respond",
                                       "stage out : respond { " + " ".join(f"p{i} = {i}" for i in range(n)) + " }")


def pipelines_text(n: int) -> str:
    return "".join(f"pipeline p{i} {{ stage request : requests }}\n" for i in range(n))


# 2,000 of a kind: each gets its own positioned error, none is dropped or capped; the work grows
# linearly, counted in calls between COUNTED, 2x and 4x (a quadratic slip shows at those sizes;
# at 20,000 it only showed as seconds, which no test asserts)
def test_2000_params_in_one_stage_are_2000_positioned_errors(tmp_path):
    f = tmp_path / "params.agp"
    f.write_text(params_text(2_000))
    diags = load(f)
    assert len(diags) == 2_000 and all(d.message.startswith("unknown parameter") for d in diags)
    out = cli_check(f, child=False)
    assert out.count("error: unknown parameter") == 2_000 and len(out) < 2_000 * 600
    assert_linear_work(loads, params_text, COUNTED, "params")


def test_2000_pipelines_are_checked(tmp_path):
    diags = loads(pipelines_text(2_000))
    assert len(diags) == 2_000 and all(d.pos.line == i + 1 for i, d in enumerate(diags))
    assert_linear_work(loads, pipelines_text, COUNTED, "pipelines")


def calls(fn, *args) -> int:
    """How many Python and builtin calls `fn(*args)` made (generator resumptions count): a
    measure of work that a busy machine does not change, unlike seconds."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn(*args)
    finally:
        prof.disable()
    return pstats.Stats(prof).total_calls


# the smallest of the three sizes counted: a check does ~600 calls a stage, fmt ~300, so one more
# call for each pair of stages (the quadratic slips these tests caught: a sweep, a note or a
# did-you-mean per stage over all stages) already makes a doubling cost over 3x at 250
COUNTED = 250


def assert_linear_work(fn, make, n: int, what: str) -> None:
    """The work of `fn(make(k))` grows linearly in k: between n, 2n and 4n the second step costs
    about twice the first (linear: 2; quadratic: 4; fixed costs cancel). A call first, so caches
    and the grammar are built outside the counts."""
    fn(make(n // 10))
    c1, c2, c4 = (calls(fn, make(k)) for k in (n, 2 * n, 4 * n))
    growth = (c4 - c2) / (c2 - c1)
    assert growth < 3, f"{what}: {c1}, {c2}, {c4} calls for {n}, {2 * n}, {4 * n}: grows {growth:.2f}x a doubling"


def stages_text(shape: str, n: int) -> str:
    if shape == "chain":
        return chain_of(n)
    if shape == "deadend":
        return chain_of(n, last="")
    return chain_of(n).replace(" -> ".join(f"s{i}" for i in range(n)), " -> ".join(f"t{i}" for i in range(n)))


@pytest.mark.parametrize("shape, n", [("chain", 2_000), ("deadend", 2_000), ("undefined", 2_000)])
def test_check_of_many_stages_is_linear(shape, n, monkeypatch):
    """chain: 2,000 route stages in one statement (was quadratic: the item types a stage can
    carry were recomputed sweep after sweep); deadend: a chain without the way
    out (one error at the dead end, was one per stage); undefined: arrows between undefined names
    among as many stages, a did-you-mean each (was quadratic; difflib's comparisons are bounded by
    a budget per list, made small here so the sizes checked and counted are past it). The work of
    each grows linearly, counted in calls; bench/check_scaling.py prints seconds up to 20,000."""
    text = stages_text(shape, n)
    assert len(text.encode()) < loader.MAX_FILE_BYTES
    monkeypatch.setattr(Suggestions, "BUDGET", 20_000)
    diags = loads(text)
    if shape == "chain":
        assert diags == []
    elif shape == "deadend":              # one error at the dead end (its note names the stages it strands)
        (dead,) = [d for d in errors(diags) if f"s{n - 1}" in d.message]
        assert len(errors(diags)) <= 2, [d.message[:120] for d in errors(diags)]
    else:
        assert len(errors(diags)) >= n
    assert_linear_work(loads, lambda k: stages_text(shape, k), COUNTED, shape)


def test_did_you_mean_compares_at_most_its_budget_of_names():
    compared = []
    real = difflib.SequenceMatcher.set_seq1

    def count(self, a):
        compared.append(a)
        return real(self, a)

    names = [f"stage_{i}" for i in range(300)]
    hints = Suggestions(names, budget=1_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(difflib.SequenceMatcher, "set_seq1", count)
        assert hints.hint("stage_7x") == "did you mean 'stage_7'?"       # within the budget: fuzzy
        for i in range(20):
            hints.hint(f"unknown_{i}")
        assert hints.hint("STAGE_9") == "did you mean 'stage_9'?"        # past it: case only
    assert len(compared) <= 1_000


# ---------------------------------------------------------------- rendering and fmt

def test_an_error_far_into_a_long_line_shows_a_window_with_the_caret_under_it():
    text = "pipeline p { " + " ".join(f"stage s{i} : route" for i in range(3000)) + " stage z : genrate }"
    program, diags = pipeline_dsl.loads(text, "t.agp")
    (d,) = [d for d in diags if "genrate" in d.message]
    head, line, caret, *_ = d.render(program.sources).splitlines()
    assert head.startswith("t.agp:1:") and len(line) < 200 and "…" in line
    at = caret.index("^")
    assert line[at:at + len("genrate")] == "genrate" and caret.count("^") == len("genrate")


def test_expected_list_names_at_most_40_stages_and_counts_the_rest():
    (d,) = errors(loads(chain_of(100).replace("-> s99 ->", "-> s99x ->")))
    assert d.message == "edge to undefined stage 's99x'" and d.expected.endswith(", s39, … (66 more)")   # 106 stages
    assert d.hint == "did you mean 's99'?"


def test_fmt_of_many_commented_stages_is_linear():
    from pipeline_dsl.fmt import format_text

    def text(n):
        return "pipeline p {\n" + "".join(f"    stage s{i} : route  # c{i}\n    # own {i}\n" for i in range(n)) + "}\n"
    out, diags = format_text(text(2_000))
    assert_linear_work(format_text, text, COUNTED, "fmt")     # comments were attached in quadratic time
    assert diags == [] and out.count("# own") == 2_000 and "stage s1999 : route {}  # c1999" in out


def _bad_settings_after(stages: int, bad: int = 12) -> str:
    lines = ["pipeline p {"] + [f"    stage s{i} : respond {{}}" for i in range(stages)]
    return "\n".join(lines + [f"    bad{i} = = {i}" for i in range(bad)] + ["}"]) + "\n"


def test_each_syntax_error_after_the_first_costs_a_parse_of_its_statement_not_of_the_file():
    """Recovery resumes from a state the first parse kept before the statement it blanks: after
    500 stages, three more errors cost a small part of the one parse of the file (each had
    cost a parse of the whole file: four errors, five parses). Counted in calls."""
    one, four = _bad_settings_after(500, 1), _bad_settings_after(500, 4)
    assert [d.pos.line for d in parser.parse(four, "t.agp")[1]] == [502, 503, 504, 505]
    parser.parse(one, "t.agp")
    first, more = calls(parser.parse, one, "t.agp"), calls(parser.parse, four, "t.agp")
    assert more - first < first / 4, f"{first} calls for one error, {more} for four"


def test_a_big_file_of_mistakes_reports_as_many_as_its_reparse_budget_finds(monkeypatch):
    """Each syntax error after the first is counted as a parse of the whole file (it was one: 10
    parses of a file near the 1 MiB cap took half a minute): a small file gets the first
    MAX_SYNTAX_ERRORS of its twelve, a big one only as many as RECOVERY_CHARS of that finds, the
    first always. The budget is scaled down here with the file, so the test parses kilobytes,
    not megabytes."""
    small = _bad_settings_after(10)
    _, diags = parser.parse(small, "small.agp")
    assert len(diags) == parser.MAX_SYNTAX_ERRORS
    assert [d.pos.line for d in diags] == list(range(12, 12 + parser.MAX_SYNTAX_ERRORS))
    big = _bad_settings_after(1_000)
    monkeypatch.setattr(parser, "RECOVERY_CHARS", 3 * len(big) + 10)
    _, diags = parser.parse(big, "big.agp")
    assert [d.pos.line for d in diags] == [1_002, 1_003, 1_004, 1_005]     # the first, then 3 re-parses
    assert all(d.message == "unexpected '='" for d in diags)
    monkeypatch.setattr(parser, "RECOVERY_CHARS", len(big) - 1)
    assert [d.pos.line for d in parser.parse(big, "big.agp")[1]] == [1_002]
