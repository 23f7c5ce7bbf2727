"""Property: mutated examples never make `check` raise, and every error has a position.

Mutations of the example files: truncation, deleted / duplicated / swapped tokens
and lines, inserted random bytes and unicode. 1,000 text cases + 400 byte cases
(derandomized: the same ones every run; each of the nine mutations lands on each seed
file several times). When a mutant parses, `fmt` must also keep its AST and be
idempotent. Hostile families around the limits (includes of devices, FIFOs,
directories, huge files and deep include chains; deep nesting; many parameters, stages
and arrows): 100 cases, a dozen a family; tests/test_dsl_limits.py has each family at
its limits, and its work counted at growing sizes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline_dsl
from pipeline_dsl.diagnostics import render_all
from pipeline_dsl.fmt import format_module
from pipeline_dsl.parser import parse

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.agp"))
         + sorted((ROOT / "examples" / "errors").glob("*.agp"))]
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|->|[{}\[\]=,:]|#[^\n]*|[^\s{}\[\]=,:"#]+|\s+')

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated_text(draw) -> str:
    text = SEEDS[draw(st.integers(0, len(SEEDS) - 1))].decode("utf-8", "replace")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "del_tok", "dup_tok", "swap_tok", "del_line", "dup_line",
                                   "swap_line", "insert_unicode", "replace_tok"]))
        toks = _tokens(text)
        lines = text.split("\n")
        if op == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        elif op in ("del_tok", "dup_tok", "replace_tok") and toks:
            i = draw(st.integers(0, len(toks) - 1))
            if op == "del_tok":
                del toks[i]
            elif op == "dup_tok":
                toks.insert(i, toks[i])
            else:
                toks[i] = draw(st.sampled_from(["{", "}", "=", "->", "when", "stage", "on", "[", "]", ",",
                                                '"', "1ms", "5MiB", "-1", "1e999", "0.5", "true", "x", ":",
                                                "pipeline", "use", "#", "\\", "9" * 30]))
            text = "".join(toks)
        elif op == "swap_tok" and len(toks) > 1:
            i, j = draw(st.integers(0, len(toks) - 1)), draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
            text = "".join(toks)
        elif op in ("del_line", "dup_line", "swap_line") and lines:
            i = draw(st.integers(0, len(lines) - 1))
            if op == "del_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "insert_unicode":
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.text(min_size=1, max_size=4)) + text[i:]
    return text


POSITIONED = re.compile(r"^[^\s:][^:]*:\d+:\d+: (error|warning): ")


def _check_never_raises(data: bytes, path: str):
    # a new file each time: rewriting one in place (truncated on open) waits ~5 ms on ext4, whose
    # replace-by-truncate flush writes it out at close (over 10 s of the module's examples, idle)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with open(path, "xb") as fh:
        fh.write(data)
    program, diags = pipeline_dsl.load(path)       # must not raise
    for d in diags:
        assert d.pos is not None, d
        assert d.pos.line >= 1 and d.pos.col >= 1, d
    out = render_all(diags, program.sources)        # rendering must not raise either
    heads = [ln for ln in out.splitlines() if ("error:" in ln or "warning:" in ln) and not ln.startswith(" ")]
    assert all(POSITIONED.match(ln) for ln in heads), heads[:3]
    assert "internal error" not in out
    return program


_DIR = _FILE = None       # the module's folder, made when its tests run (not in every worker that imports it)


@pytest.fixture(scope="module", autouse=True)
def _module_dir():
    """The module's files (a 1 MiB one, a FIFO) go with it: not left in the temporary folder."""
    global _DIR, _FILE
    _DIR = tempfile.mkdtemp(prefix="agp-fuzz-")
    _FILE = os.path.join(_DIR, "mutant.agp")
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


@FUZZ
@given(mutated_text())
def test_mutated_text_never_raises_and_errors_have_positions(text):
    program = _check_never_raises(text.encode("utf-8", "surrogatepass"), _FILE)
    if program.sources.get(program.root) == text:   # load parsed this very text: its module (None: syntax errors)
        module = program.modules.get(program.root)
    else:                                        # read otherwise (not UTF-8, a BOM dropped, \r\n as \n): parsed here
        module, _ = parse(text, "m.agp")
    if module is not None:
        once = format_module(module)                 # format_text(text), its text parsed just above
        again, _ = parse(once)
        assert again == module
        assert format_module(again) == once          # format_text(once), its text parsed just above


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(SEEDS) - 1), st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_random_bytes_never_raise(seed, at, junk):
    data = SEEDS[seed]
    at = at % (len(data) + 1)
    _check_never_raises(data[:at] + junk + data[at:], _FILE)


# ---------------------------------------------------------------- hostile families, around the limits

def _include_targets() -> list[str]:
    """Files beside the mutant that a hostile `use` names: made once."""
    from pipeline_dsl import loader

    if not os.path.exists(os.path.join(_DIR, "big.agp")):
        with open(os.path.join(_DIR, "big.agp"), "w") as fh:
            fh.write("#" * loader.MAX_FILE_BYTES + "\n")
        os.mkdir(os.path.join(_DIR, "dir.agp"))
        if hasattr(os, "mkfifo"):
            os.mkfifo(os.path.join(_DIR, "fifo.agp"))
        for i in range(100):                       # a chain of uses past the depth cap
            with open(os.path.join(_DIR, f"deep{i}.agp"), "w") as fh:
                fh.write(f'use "deep{i + 1}.agp"\n' if i < 99 else "pipeline deep { }\n")
    return ["/dev/zero", "/dev/urandom", "/dev/null", "fifo.agp", "dir.agp", "big.agp", "deep0.agp",
            "missing.agp", "mutant.agp", "a\\0b"]


@st.composite
def hostile_text(draw) -> str:
    family = draw(st.sampled_from(["use", "list", "not", "parens", "params", "stages", "arrows", "ors"]))
    n = draw(st.one_of(st.integers(1, 80), st.integers(60, 70), st.integers(100, 3000)))
    base = SEEDS[draw(st.integers(0, len(SEEDS) - 1))].decode("utf-8", "replace")
    if family == "use":
        return f'use "{draw(st.sampled_from(_include_targets()))}"\n' + base
    if family == "list":
        return base.replace("{}", "{ x = " + "[" * n + "1" + "]" * n + " }", 1)
    if family in ("not", "parens", "ors"):
        cond = {"not": "not " * n + "full", "parens": "(full and (timeout or " * n + "full" + "))" * n,
                "ors": " or ".join(["full"] * n)}[family]
        return base.replace("when full", "when " + cond, 1)
    if family == "params":
        return base.replace("{}", "{ " + " ".join(f"p{i} = {i}" for i in range(n)) + " }", 1)
    if family == "stages":
        return base.replace("{", "{ " + "".join(f"stage s{i} : route\n" for i in range(n)), 1)
    return base.replace("->", "-> " + " -> ".join(f"s{i}" for i in range(n)) + " ->", 1)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(hostile_text())
def test_hostile_families_never_raise_and_errors_have_positions(text):
    _check_never_raises(text.encode("utf-8"), _FILE)
