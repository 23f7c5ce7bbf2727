"""Malformed programs through the command line: every `.agp` is accepted (exit 0) or refused with
a clear error that names the file and a line (exit 2), never a traceback or an internal error;
`plan` and `render` agree with `check`; and what `check` accepts runs.

tests/test_dsl_fuzz.py mutates example text and calls the loader; tests/test_program_property.py
builds valid programs. This file takes every example and every pipeline snippet of docs/*.md
(stage lines alone go inside examples/chat.agp's pipeline), mutates it, and runs what a user runs:
`agp check`, `agp plan`, `agp render -o x.svg` (x.dot without graphviz) and `agp fmt`, through
cli.main. Mutations: tokens and lines deleted, duplicated, swapped; identifiers made near names
or keywords; numbers made 0, -1, huge, 1e309, NaN, 1_000, unicode digits; strings made
unterminated or given escapes (NUL, control characters, U+FFFF) or made very long; deep nesting;
a `use` of a missing file, the file itself, a folder, a binary file, a device; a BOM, CRLF, tabs,
bytes that are not UTF-8; an empty file, only comments; and, keeping the syntax, a stage's
parameters at the edges of its kind's schema (and past them), settings, extra edges and
conditions, another kind. A mutant `check` accepts runs over two request lines on the tiny model
(`agp run`): every line gets a record, an answer or its own clear error; a run-time refusal (a
device or a memory the machine lacks) is exit 2 at a line of the file.

MUTATION_EXAMPLES sets how many mutants (default 30, about 20 s); a long run:

    MUTATION_EXAMPLES=3000 OMP_NUM_THREADS=1 pytest -q -x tests/test_program_mutations.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from clikit import agp_in
from stages.registry import default_registry

EXAMPLES = int(os.environ.get("MUTATION_EXAMPLES", "30"))
ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = '"smollm2-135m-instruct"'


def _seeds() -> list[tuple[str, str]]:
    """(name, text) of every example and every pipeline snippet of the docs."""
    chat = (ROOT / "examples" / "chat.agp").read_text(encoding="utf-8")
    out = [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8", errors="replace"))
           for p in sorted((ROOT / "examples").glob("*.agp")) + sorted((ROOT / "examples" / "errors").glob("*.agp"))]
    for md in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for i, m in enumerate(re.finditer(r"^```[a-z]*\n(.*?)^```", md.read_text(encoding="utf-8"), re.S | re.M)):
            block = m.group(1)
            if not re.search(r"^\s*(pipeline\s+\w+\s*\{|stage\s+\w+\s*:)", block, re.M) or "$ " in block:
                continue
            if not re.search(r"^\s*pipeline\s", block, re.M):          # stage lines alone: inside chat's pipeline
                block = chat[:chat.rindex("}")] + block.replace("…", "") + "}\n"
            out.append((f"{md.name}#{i}", block))
    return out


SEEDS = _seeds()
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|->|[{}\[\]=,:()]|#[^\n]*|[^\s{}\[\]=,:()"#]+|\s+')
KEYWORDS = ["pipeline", "stage", "use", "when", "otherwise", "on", "and", "or", "not", "true", "false", "none",
            "host", "compute", "requests", "respond", "generate", "python", "join", "model", "mode", "device",
            "->", "{", "}", "[", "]", "(", ")", "=", ":", ",", "#", "\\", '"']
NUMBERS = ["0", "-1", "-0", "1e309", "-1e309", "NaN", "inf", "1_000", "٣", "１", "²", "9" * 40, "0x10", "1.",
           ".5", "1e", "1e-400", "+1", "1e309ms", "-1ms", "nanms", "1e30MiB", "1/2", "1..2"]
STRINGS = ['"', '"abc', '"a\\"', '"\\x00"', '"\\0"', '"\\u0001"', '"\\u0008\\uffff"', '"\\q"', '"\x00"', '""',
           '"' + "a" * 3000 + '"', "'single'", '"\\ud800"', '"hooks:nope"', '"nomod:fn"', '"../x"', '"\u202e"']
USES = ["missing.agp", "main.agp", "./main.agp", "folder.agp", "binary.agp", "empty.agp", "comments.agp",
        "/dev/null", "/dev/zero", "../x.agp", "", "hooks.py", "a\\0b.agp"]
NEAR = [lambda w: w[:-1], lambda w: w + "s", str.upper, lambda w: w[::-1], lambda w: w + "_",
        lambda w: w.replace("e", "е")]         # the last: a Cyrillic e
KINDS = default_registry()
STAGE = re.compile(r"stage\s+(\w+)\s*:\s*(\w+)")
CONDITIONS = ["full", "timeout", "prompt_tokens > 0", "prompt_tokens > 1e308", 'model == "x"',
              'metadata.a.b == 1', "stream == true", 'finish_reason == "stop"', "completion_tokens > 2",
              "not full", "full and timeout", "x", "prompt_tokens == true", 'metadata.k == "\\u0001"']


def _edge_value(draw, p) -> str:
    """A value for parameter `p` at the edges of its schema, just past them, or oddly spelt; kept
    small where a large one costs the run time or memory (durations, sizes, threads)."""
    if p.type == "int":
        picks = [v for v in (p.min, p.max, (p.max or 0) + 1, (p.min or 0) - 1, 0, 1, 2) if v is not None]
        if p.name in ("workers", "max_new_tokens", "min_tokens", "max_batch_size"):
            picks = [v for v in picks if v <= 64]
        return str(int(draw(st.sampled_from(picks))))
    if p.type == "float":
        return repr(float(draw(st.sampled_from([v for v in (p.min, p.max, 0, 1, 1e-9) if v is not None]))))
    if p.type == "bool":
        return draw(st.sampled_from(["true", "false", "1", '"true"']))
    if p.type == "enum":
        return draw(st.sampled_from([*p.choices, f'"{p.choices[0]}"']))
    if p.type == "duration":
        return draw(st.sampled_from(["0", "0s", "1us", "1ms", "1e-9s", "1d", "-1ms", "1e9s"]))
    if p.type == "size":
        return draw(st.sampled_from(["64KiB", "1MiB", "63KiB", "1B", "0", "1TiB", "4MiB"]))
    if p.type == "list_str":
        return draw(st.sampled_from(["[]", '[""]', '["a", "a"]', '["\\n"]', '["\\u0001"]', '["é", "😀"]',
                                     "[" + ", ".join(['"x"'] * 200) + "]"]))
    if p.name == "fn":
        return draw(st.sampled_from(['"hooks:redact_pii"', '"hooks:guard_output"', '"hooks:nope"', '"hooks"',
                                     '"json:dumps"', '"hooks:__name__"']))
    return draw(st.sampled_from(['""', '"x"', '"\\u0001\\uffff"', '"a\\\\b"', '"<&>"', '"schema.json"',
                                 '"missing.json"', '"hooks.py"']))


@st.composite
def mutant(draw) -> tuple[str, bytes]:
    """(the seed's name, the mutant's bytes)."""
    syntax = draw(st.booleans())               # else mutations that keep the syntax, of a valid example
    name, text = draw(st.sampled_from(SEEDS if syntax else [s for s in SEEDS if "/errors/" not in s[0]]))
    raw = None
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["del_tok", "dup_tok", "swap_tok", "del_line", "dup_line", "swap_line", "near",
                                   "keyword", "number", "string", "nest", "use", "bom", "crlf", "tabs", "nonutf8",
                                   "nul", "empty", "comments", "truncate"] if syntax else
                                  ["param", "param", "param", "escape", "escape", "setting", "edge", "kind",
                                   "placement"]))
        toks, lines = TOKEN.findall(text), text.split("\n")
        idx = [i for i, t in enumerate(toks) if not t.isspace()]
        stages = STAGE.findall(text)
        pick = lambda xs: draw(st.sampled_from(xs))            # noqa: E731
        if op in ("del_tok", "dup_tok", "swap_tok", "near", "keyword", "number", "string") and idx:
            i = pick(idx)
            if op == "del_tok":
                toks[i] = ""
            elif op == "dup_tok":
                toks[i] += " " + toks[i]
            elif op == "swap_tok":
                j = pick(idx)
                toks[i], toks[j] = toks[j], toks[i]
            elif op == "near":
                words = [k for k in idx if re.fullmatch(r"[A-Za-z_]\w*", toks[k])] or [i]
                k = pick(words)
                toks[k] = pick(NEAR)(toks[k]) or "x"
            elif op == "keyword":
                toks[i] = pick(KEYWORDS)
            else:
                like = [k for k in idx if (toks[k][0].isdigit() or toks[k][0] == "-" if op == "number"
                                           else toks[k].startswith('"'))]
                toks[pick(like or [i])] = pick(NUMBERS if op == "number" else STRINGS)
            text = "".join(toks)
        elif op in ("del_line", "dup_line", "swap_line"):
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "del_line":
                del lines[i]
            elif op == "dup_line":
                lines.insert(i, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "nest":
            n = pick([5, 100, 3000])
            text = pick([text.replace("{}", "{ x = " + "[" * n + "1" + "]" * n + " }", 1),
                         text.replace("when full", "when " + "(" * n + "full" + ")" * n, 1),
                         text.replace("when full", "when " + "not " * n + "full", 1), "{" * n + text + "}" * n])
        elif op == "use":
            line = f'use "{pick(USES)}"\n'
            text = line + text if draw(st.booleans()) else text + "\n" + line
        elif op in ("bom", "crlf", "tabs"):
            text = {"bom": "\ufeff" + text, "crlf": text.replace("\n", "\r\n"), "tabs": text.replace("    ", "\t")}[op]
        elif op == "nonutf8":
            b = text.encode("utf-8", "surrogatepass")
            at = draw(st.integers(0, len(b)))
            raw = b[:at] + pick([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + b[at:]
        elif op == "nul":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + "\x00" + text[at:]
        elif op == "empty":
            text = pick(["", "\n\n", "\t", "\ufeff"])
        elif op == "comments":
            text = "\n".join("# " + ln for ln in lines)
        elif op == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        elif op == "param" and stages:
            stage, kind = pick(stages)
            k = KINDS.get(kind)
            if k is None or not k.params:
                continue
            p = pick(k.params)
            m = re.search(r"stage\s+" + stage + r"\s*:\s*\w+(\s+on\s+\w+)?\s*(\{)?", text)
            setting = f" {p.name} = {_edge_value(draw, p)} "
            text = text[:m.end()] + (setting if m.group(2) else " {" + setting + "}") + text[m.end():]
        elif op == "escape":                   # a string of the file given an escape: a control character …
            strings = [m for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"', text) if "model" not in text[:m.start()][-12:]]
            prompts = [m for m in strings if re.search(r"\btext\s*=\s*$", text[:m.start()])]   # drawn in a box
            strings = prompts if prompts and draw(st.integers(0, 2)) else strings
            m = pick(strings) if strings else None
            if m is not None:
                at = m.start() + 1 + draw(st.integers(0, len(m.group()) - 2))
                if text[at - 1] != "\\":
                    text = text[:at] + pick(["\\u0001", "\\u0008", "\\uffff", "\\ufffe", "\\0", "\\t", "\\n",
                                             "\\u001b[2J", "\\\\", '\\"', "<&>"]) + text[at:]
            if "when full" in text:
                text = text.replace("when full", pick(['when metadata.k == "\\u0001" or full', "when full"]), 1)
        elif op == "setting" and "{" in text:
            i = text.index("{") + 1
            text = text[:i] + "\n    " + pick(["mode = efficient", "mode = performance", "dtype = bf16",
                                                "dtype = int8", "threads = 1", "kv_budget = 4MiB", "kv_budget = 1TiB",
                                                "device = cpu", "device = cuda:7", "device = gpu"]) + "\n" + text[i:]
        elif op == "edge" and stages and "}" in text:
            a, b = pick(stages)[0], pick(stages)[0]
            tail = pick(["", " otherwise", " when " + pick(CONDITIONS)])
            i = text.rindex("}")
            text = text[:i] + f"    {a} -> {b}{tail}\n" + text[i:]
        elif op == "kind" and stages:
            stage, kind = pick(stages)
            text = re.sub(r"(stage\s+" + stage + r"\s*:\s*)" + kind, r"\g<1>" + pick(KINDS.names()), text, count=1)
        elif op == "placement" and stages:
            stage, _ = pick(stages)
            text = re.sub(r"(stage\s+" + stage + r"\s*:\s*\w+)", r"\1 on " + pick(["host", "copy", "compute"]),
                          text, count=1)
    return name, raw if raw is not None else text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def folder(tiny_gguf, tmp_path_factory):
    """The mutants' folder: the examples' hooks, a schema, and what a hostile `use` names."""
    root = tmp_path_factory.mktemp("mutants")
    shutil.copy(ROOT / "examples" / "hooks.py", root / "hooks.py")
    (root / "schema.json").write_text('{"type": "object"}', encoding="utf-8")
    (root / "binary.agp").write_bytes(bytes(range(256)) * 4)
    (root / "folder.agp").mkdir()
    (root / "empty.agp").write_text("", encoding="utf-8")
    (root / "comments.agp").write_text("# only\n# comments\n", encoding="utf-8")
    (root / "in.jsonl").write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}\n'
        '{"id": "b", "prompt": "the cat", "max_tokens": 2}\n', encoding="utf-8")
    return root, json.dumps(str(tiny_gguf))


def _refused_where(r, path: str, command: str) -> None:
    """Exit 2 with an error at a file:line:col that names the file given (where the error stands in
    a file it includes: the note of its `use`); never an internal error."""
    assert r.returncode == 2, f"agp {command}: exit {r.returncode}\n{r.stderr[-2000:]}"
    assert re.search(r"\.agp:\d+:\d+: error: ", r.stderr) and re.search(re.escape(path) + r":\d+:\d+", r.stderr), \
        f"agp {command}: no file:line:col\n{r.stderr[-2000:]}"
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=mutant())
def test_every_mutated_program_is_accepted_or_refused_at_a_line_and_what_check_accepts_runs(case, folder):
    root, model = folder
    seed, data = case
    data = data.replace(EMBEDDED.encode(), model.encode())          # the tiny model, so that a run is quick
    path = str(root / "main.agp")
    Path(path).write_bytes(data)
    note(f"seed {seed}:\n{data.decode('utf-8', 'replace')[:4000]}")
    out = "x.svg" if shutil.which("dot") else "x.dot"
    results = {}
    for command, argv in (("check", ["check", path]), ("plan", ["plan", path]),
                          ("render", ["render", path, "-o", str(root / out)]), ("fmt", ["fmt", path])):
        r = agp_in(*argv, cwd=root)
        results[command] = r.returncode
        if r.returncode != 0:
            _refused_where(r, path, command)
    assert results["plan"] == results["render"] == results["check"], results      # plan and render agree with check
    event("accepted" if results["check"] == 0 else "refused")
    if results["check"] != 0:
        return
    answers = root / "out.jsonl"
    r = agp_in("run", path, "-i", root / "in.jsonl", "-o", answers, "--overwrite", "--no-progress",
               "--threads", "1", cwd=root)
    if r.returncode == 2:                       # what only a run finds (a device, the memory): at a line
        _refused_where(r, path, "run")
        event("run refused at a line")
        return
    assert r.returncode in (0, 1) and "internal error" not in r.stderr, r.stderr[-2000:]
    records = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert sorted(rec["id"] for rec in records) == ["a", "b"], records
    for rec in records:
        assert isinstance(rec.get("text"), str) or rec.get("error", {}).get("message"), rec
    if r.returncode == 1:                       # every line failed: each has its own error
        assert all("error" in rec for rec in records), records
