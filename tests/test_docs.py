"""The documentation's examples stay true (README.md and docs/*.md), without loading a model: every
`agp` command line they show parses with the flags that exist, every whole pipeline they show checks
clean and every one-line stage of their snippets too, a snippet line that names an example quotes
it, the outputs they quote are what the commands print, the tables (built-in kinds with their
parameters, item types and resources, modes, condition fields, serve flags, limits and defaults,
OpenAI fields, the planner's work) say what the code does, the request bodies they send parse, the
engine's dataclasses list every field, every file and test they point at is there, the README tour's
commands that need no model exit as it says, the README lists every page, the architecture page's
stage kind checks and runs, the serve page's error table names every error code the server answers,
and the startup banner the serve page quotes has the clauses `agp serve` prints and its metric names
are the families /metrics exports (both built on the tiny model, none loaded otherwise). (The
examples themselves run in tests/test_examples.py.)"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

import pipeline_dsl
from pipeline_dsl.cli import build_parser
from pipeline_dsl.diagnostics import has_errors, render_all
from pipeline_dsl.plan import format_plan, make_plan

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)


def blocks(path: Path, lang: str | None = None) -> list[str]:
    """The fenced code blocks of a page (of one language: "" for a block without one)."""
    return [body for tag, body in FENCE.findall(path.read_text()) if lang is None or tag == lang]


def command_lines(path: Path):
    """Each `agp ...` command of the page's shell blocks, its indented examples and its `$ agp`
    lines, as argv after `agp` (continuations joined, comments and `&`/`|` tails cut)."""
    text = path.read_text()
    shell = [b for tag, b in FENCE.findall(text) if tag in ("sh", "bash")]
    joined = re.sub(r"\\\n\s*", " ", text)            # an indented command continued with a backslash
    shell += [m.group(1) for m in re.finditer(r"^(?:    |\$ )(agp .*)$", joined, re.M)]
    for block in shell:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            for part in re.split(r"\s(?:\|\|?|&&?|;)\s?", line + " "):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]                        # VAR=value agp ...
                if len(words) > 1 and words[0] == "agp":
                    # a placeholder value (`--port P`, `--replicas N`, `--url http://host:P`) stands for a number
                    yield [("1" if re.fullmatch(r"[A-Z][A-Z_]*", w) and words[i].startswith("--")
                            else re.sub(r"^(https?://[^/:]+):[A-Z][A-Z_]*\b", r"\1:1", w))
                           for i, w in enumerate(words[1:])]


def test_the_docs_show_agp_commands_of_every_kind():
    seen = {argv[0] for page in DOCS for argv in command_lines(page)}
    assert {"check", "fmt", "render", "plan", "stages", "run", "serve", "bench"} <= seen


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_agp_command_line_in_the_docs_uses_flags_that_exist(page):
    for argv in command_lines(page):
        parser = build_parser(argv)
        try:
            _, unknown = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `agp {' '.join(argv)}` does not parse")
        assert not unknown, f"{page.name}: `agp {' '.join(argv)}`: no such flag {unknown}"


def whole_pipelines(page: Path) -> list[str]:
    out = []
    for body in blocks(page, ""):
        code = "\n".join(ln for ln in body.splitlines() if not ln.lstrip().startswith("#"))
        if code.lstrip().startswith("pipeline ") and code.rstrip().endswith("}") and "…" not in code:
            out.append(body)
    return out


def test_every_whole_pipeline_in_the_docs_checks_clean():
    found = {page.name: whole_pipelines(page) for page in DOCS}
    assert found["README.md"] and found["language.md"]
    for name, texts in found.items():
        for text in texts:
            program, diags = pipeline_dsl.loads(text, file=str(ROOT / "examples" / f"from_{name}.agp"))
            assert not diags, f"{name}:\n{render_all(diags, program.sources)}"


def test_the_quoted_diagnostic_is_the_golden_one():
    # docs/language.md, "Diagnostics": the output of `agp check examples/errors/unknown_kind.agp`
    quoted = next(b for b in blocks(ROOT / "docs" / "language.md", "") if "unknown stage kind" in b)
    assert quoted == (ROOT / "examples" / "errors" / "unknown_kind.expected").read_text()


def test_the_quoted_plan_is_what_agp_plan_prints():
    quoted = next(b for b in blocks(ROOT / "docs" / "plan.md", "") if b.startswith("$ agp plan examples/chat.agp"))
    graph = pipeline_dsl.load_pipeline_graph(str(ROOT / "examples" / "chat.agp"))
    assert quoted.split("\n", 1)[1] == format_plan(make_plan(graph)) + "\n"


def test_the_python_api_example_of_the_language_reference_runs():
    quoted = next(b for b in blocks(ROOT / "docs" / "language.md", "python") if "load_pipeline_graph" in b)
    program, diagnostics = pipeline_dsl.load(str(ROOT / "examples" / "chat.agp"))
    assert not has_errors(diagnostics)
    graph = pipeline_dsl.load_pipeline_graph(str(ROOT / "examples" / "chat.agp"))
    assert "# 0.001 (seconds)" in quoted and graph.nodes["batch"]["params"]["timeout"] == 0.001


def serve_options() -> dict[str, str]:
    """Each flag of `agp serve` -> its variable."""
    from pipeline_dsl.serve.options import env_name

    parser = build_parser(["serve"]).commands["serve"]
    return {flag: env_name(a) for a in parser._actions for flag in a.option_strings}


@pytest.mark.parametrize("name", ["serve.md", "scale.md"])
def test_the_serve_flag_tables_name_flags_that_exist(name):
    options = serve_options()
    rows = [ln for ln in (ROOT / "docs" / name).read_text().splitlines() if ln.startswith("| `--")]
    flags = {f for row in rows for f in re.findall(r"`(--[a-z][a-z-]*)", row.split("|")[1])}
    assert len(flags) > 5
    assert not flags - set(options), f"{name} names flags agp serve lacks: {sorted(flags - set(options))}"


def test_every_serve_flag_is_in_a_flag_table():
    # the reverse of the test above: a flag of `agp serve --help` that no table of serve.md or
    # scale.md names is one a reader of the pages cannot find (aliases of a named flag aside)
    parser = build_parser(["serve"]).commands["serve"]
    rows = [re.split(r"(?<!\\)\|", ln)[1] for name in ("serve.md", "scale.md")      # `text\|json` is one cell
            for ln in (ROOT / "docs" / name).read_text().splitlines() if ln.startswith("| `--")]
    named = {f for row in rows for f in re.findall(r"`(--[a-z][a-z-]*)", row)}
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest not in ("help", "version")
               and not set(a.option_strings) & named]
    assert not missing, f"no flag table of the serve pages names {missing}"


def test_the_values_a_serve_flag_table_lists_are_the_flags_choices():
    # docs/serve.md: | `--scheduling-policy fcfs\|priority` | ... — the words a row lists are what
    # the flag takes (its argparse choices), no more and no fewer
    parser = build_parser(["serve"]).commands["serve"]
    choices = {f: set(a.choices) for a in parser._actions if a.choices for f in a.option_strings}
    rows = [re.split(r"(?<!\\)\|", ln)[1] for ln in (ROOT / "docs" / "serve.md").read_text().splitlines()
            if ln.startswith("| `--")]
    listed = {flag: set(values.split("\\|")) for row in rows
              for flag, values in re.findall(r"`(--[a-z-]+) ([a-z]+(?:\\\|[a-z]+)+)`", row)}
    assert len(listed) >= 2
    bad = [f"{flag}: the table lists {sorted(v)}, agp serve takes {sorted(choices.get(flag, ()))}"
           for flag, v in listed.items() if v != choices.get(flag)]
    assert not bad, "\n".join(bad)


def test_every_agp_variable_the_docs_name_is_read():
    from pipeline_dsl.serve.options import ENGINE_VARIABLES

    variables = set(serve_options().values()) | set(ENGINE_VARIABLES)
    named = {v for page in DOCS for v in re.findall(r"\bAGP_[A-Z][A-Z_]*[A-Z]\b", page.read_text())}
    assert {"AGP_API_KEY", "AGP_MAX_NUM_SEQS", "AGP_BATCH_INVARIANT"} <= named
    unknown = named - variables - {"AGP_MAX_NUM_SEQ"}      # serve.md's example of a typo it warns about
    assert not unknown, f"the docs name variables agp never reads: {sorted(unknown)}"


@pytest.mark.parametrize("cls", ["EngineConfig", "SamplingParams", "RequestOutput"])
def test_the_engine_dataclasses_of_the_architecture_page_list_every_field(cls):
    import dataclasses

    from pipeline_dsl.engine import config

    block = next(b for b in blocks(ROOT / "docs" / "architecture.md", "python") if f"class {cls}:" in b)
    body = block.split(f"class {cls}:", 1)[1].split("\nclass ", 1)[0].split("\n@dataclass", 1)[0]
    documented = re.findall(r"^    (\w+): ", body, re.M)
    assert documented == [f.name for f in dataclasses.fields(getattr(config, cls))]


def test_every_file_the_docs_point_at_exists():
    for page in DOCS:
        text = page.read_text()
        paths = set(re.findall(r"\b((?:tests|bench|tools|examples|pipeline_dsl|stages|docs)/[\w./-]+\.(?:py|agp|jsonl|md|lark|cpp))\b",
                               text))
        paths |= {f"examples/{m}" for m in re.findall(r"`(\w+\.agp)`", text) if (ROOT / "examples" / m).exists()
                  or page.name == "README.md"}
        missing = sorted(p for p in paths if not (ROOT / p).exists())
        assert not missing, f"{page.name} points at files that do not exist: {missing}"


def stage_lines(page: Path) -> list[str]:
    """Each whole one-line `stage NAME : KIND …` statement of the page's pipeline snippets
    (not the grammar's `stage NAME : KIND` template)."""
    out = []
    for body in blocks(page, ""):
        for line in body.splitlines():
            m = re.match(r"\s*stage\s+\w+\s*:\s*(\w+)", line)
            if m and not m.group(1).isupper() and line.count("{") == line.count("}") and "…" not in line:
                out.append(line.strip())
    return out


def test_every_stage_line_of_the_docs_snippets_checks(tmp_path):
    # a reader pastes a snippet's stage into a pipeline of theirs: its kind, parameters and the
    # function it names must be what check accepts (hooks.py beside it, as in examples/; a
    # model file the line names stands for one of the reader's own: the tiny model)
    from tiny_model import write_tiny_gguf

    (tmp_path / "hooks.py").write_text((ROOT / "examples" / "hooks.py").read_text())
    lines = [(page.name, line) for page in DOCS for line in stage_lines(page)]
    assert len(lines) > 10
    bad = []
    for name, line in lines:
        for model in re.findall(r'\bmodel\s*=\s*"([^"]+\.gguf)"', line):
            (tmp_path / model).parent.mkdir(parents=True, exist_ok=True)
            write_tiny_gguf(tmp_path / model)
        _, diags = pipeline_dsl.loads(f"pipeline doc {{\n    {line}\n}}\n", file=str(tmp_path / "doc.agp"))
        errors = [d.message for d in diags if d.is_error and d.pos and d.pos.line == 2
                  and "is not connected" not in d.message]          # alone, a stage has no edges
        bad += [f"{name}: `{line}`: {e}" for e in errors]
    assert not bad, "\n".join(bad)


def statements(text: str) -> list[str]:
    """A pipeline text's statements without comments, whitespace collapsed (a stage spans its braces)."""
    out, open_ = [], ""
    for line in text.splitlines():
        code = " ".join(line.split("#", 1)[0].split())
        if not code or (not open_ and (code == "}" or re.fullmatch(r"pipeline \w+ \{", code))):
            continue                                                  # the pipeline's own braces
        open_ = f"{open_} {code}".strip()
        if open_.count("{") == open_.count("}"):
            out.append(open_)
            open_ = ""
    return out


def test_every_snippet_line_that_names_an_example_quotes_it():
    # `stage gen : generate { n = 3 … }    # examples/vote.agp`: the reader finds that stage (with
    # at least those settings) or that edge in the file; so for the snippet's next lines, until
    # one has a comment of its own
    bad = []
    for page in DOCS:
        for body in blocks(page, ""):
            example = None
            for line in body.splitlines():
                if "#" in line and not line.lstrip().startswith("#"):
                    m = re.search(r"#\s*(examples/\w+\.agp)", line)
                    example = m.group(1) if m and (ROOT / m.group(1)).exists() else None
                code = " ".join(line.split("#", 1)[0].split())
                if not example or not code:
                    continue
                found = statements((ROOT / example).read_text())
                if code.startswith("stage "):
                    head, _, params = code.partition("{")
                    same = [s for s in found if " ".join(s.partition("{")[0].split()) == " ".join(head.split())]
                    pairs = re.findall(r'(\w+)\s*=\s*("[^"]*"|\[[^\]]*\]|[^\s}]+)', params)
                    ok = any(all(re.search(rf"\b{k}\s*=\s*{re.escape(v)}(?=[\s}}])", s) for k, v in pairs)
                             for s in same)
                else:                                                 # an edge: in a statement, or a chain's link
                    ok = any(f" {code} " in f" {s} " and (" when " in code or " otherwise" in code
                                                          or not re.search(r" (when|otherwise)\b", s))
                             for s in found)
                if not ok:
                    bad.append(f"{page.name}: `{code}` is not in {example}")
    assert not bad, "\n".join(bad)


def test_the_serve_limits_table_states_the_stop_string_bounds():
    from stages.registry import get_kind

    stop = next(p for p in get_kind("generate").params if p.name == "stop")
    row = next(ln for ln in (ROOT / "docs" / "serve.md").read_text().splitlines() if ln.startswith("| stop strings |"))
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", row.split("|")[2])]
    assert numbers == [stop.max_items, stop.max_length, stop.max_total], row


def test_the_plan_page_names_the_work_each_kind_is_split_into():
    from pipeline_dsl.plan import ITEM_WORK, WORK

    text = " ".join((ROOT / "docs" / "plan.md").read_text().split("## How the plan is made", 1)[1]
                    .split("2. **Instances.**", 1)[0].split())
    for kind, parts in WORK.items():
        named = re.search(rf"`{kind}` = ([^;]*)", text)
        assert named, f"plan.md does not say what {kind}'s work is"
        assert re.findall(r"(?:^|\+ )(\w+)", named.group(1)) == [p for p, _, _ in parts], named.group(0)
    for kind, part in ITEM_WORK.items():
        assert f"`{kind}` = {part}" in text, f"plan.md does not say {kind}'s per-request work is '{part}'"


def synopsis_commands():
    """(line, command, its argparse parser) of each line of language.md's command synopsis."""
    synopsis = next(b for b in blocks(ROOT / "docs" / "language.md", "") if b.startswith("agp check FILE"))
    for line in synopsis.splitlines():
        command = line.split()[1]
        yield line, command, build_parser([command]).commands[command]


def test_the_command_synopsis_of_the_language_reference_names_flags_that_exist():
    # docs/language.md, "Commands": `agp run FILE [-i in.jsonl] … [--resume | --overwrite]`
    bad = []
    for line, command, parser in synopsis_commands():
        flags = {f for a in parser._actions for f in a.option_strings}
        bad += [f"agp {command} {f}" for f in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", line) if f not in flags]
    assert not bad, f"language.md's synopsis names flags that do not exist: {bad}"


def test_the_command_synopsis_shows_pipeline_on_every_command_that_takes_it():
    # a file may hold several pipelines: the synopsis says how to pick one wherever agp can
    missing = []
    for line, command, parser in synopsis_commands():
        takes = any("--pipeline" in a.option_strings for a in parser._actions)
        if takes and "--pipeline NAME" not in line:
            missing.append(command)
    assert not missing, f"language.md's synopsis hides --pipeline on: {missing}"


def test_the_openai_page_says_a_join_merges_the_n_answers():
    # a client asking n = 2 of a pipeline with a join gets one choice: the page must say why
    # (the behaviour: tests/test_flow.py::test_n_samples_go_on_as_branches_into_a_join)
    row = next(line for line in (ROOT / "docs" / "openai.md").read_text().splitlines() if line.startswith("| `n` |"))
    assert "`join`" in row and "one answer" in row


def test_the_one_line_engine_chain_the_reference_shows_checks_clean():
    # a batcher's edge without a condition takes every item: users need not write full and timeout
    text = (ROOT / "docs" / "language.md").read_text()
    chain = re.search(r"`(request -> batch -> encode -> [^`]*)`", text)
    assert chain, "language.md does not show the unlabelled engine chain"
    stages = {"request": "requests", "batch": "dynamic_batch", "encode": "encode", "kv": "kv_lookup",
              "gen": "generate", "out": "respond"}
    body = "".join(f"    stage {n} : {k} {{}}\n" for n, k in stages.items())
    _, diags = pipeline_dsl.loads(f"pipeline p {{\n{body}    {chain.group(1)}\n}}\n", "t.agp")
    assert [d.message for d in diags] == []


def openai_fields() -> list[tuple[str, str, str]]:
    """(section, field, status) for each top-level field of docs/openai.md's request tables."""
    rows, section = [], ""
    for line in (ROOT / "docs" / "openai.md").read_text().splitlines():
        section = line if line.startswith("## ") else section
        m = re.match(r"\| (`[^|]*`)[^|]*\| ([^|]*) \|", line)
        if m and "field" not in m.group(1) and "tested" not in section:
            rows += [(section, f, m.group(2)) for f in re.findall(r"`([a-z_][a-z_0-9]*)", m.group(1))]
    return rows


def test_every_field_the_openai_page_supports_is_a_field_of_its_endpoint():
    from pipeline_dsl.serve.embeddings import FIELDS as EMBEDDING_FIELDS
    from pipeline_dsl.serve.protocol import CHAT_FIELDS, COMPLETION_FIELDS
    from pipeline_dsl.serve.responses import FIELDS as RESPONSE_FIELDS
    from pipeline_dsl.serve.scores import RERANK_FIELDS, SCORE_FIELDS

    endpoints = {"Both endpoints": [CHAT_FIELDS, COMPLETION_FIELDS], "vLLM's extras": [CHAT_FIELDS, COMPLETION_FIELDS],
                 "`/v1/chat/completions`": [CHAT_FIELDS], "`/v1/completions`": [COMPLETION_FIELDS],
                 "`/v1/responses`": [RESPONSE_FIELDS], "`/v1/embeddings`": [EMBEDDING_FIELDS],
                 "`/v1/rerank`": [RERANK_FIELDS], "`/v1/score`": [SCORE_FIELDS]}
    rows = [(s, f, st) for s, f, st in openai_fields() if any(s.startswith(f"## {e}") for e in endpoints)]
    assert len(rows) > 40
    bad = []
    for section, field, status in rows:
        known = next(v for e, v in endpoints.items() if section.startswith(f"## {e}"))
        if "(chat)" in status:
            known = [CHAT_FIELDS]
        if "rejected" in status and "unless" not in status:
            bad += [f"{section[3:]}: {field} is said to be rejected but is taken" for k in known if field in k]
        else:
            bad += [f"{section[3:]}: {field} ({status}) is an unrecognized request argument" for k in known
                    if field not in k]
    assert not bad, "\n".join(bad)


def test_completions_take_metadata_for_the_pipelines_conditions():
    # docs/openai.md, "Both endpoints": `metadata`, an object a pipeline's conditions read
    from pipeline_dsl.serve.protocol import APIError, parse_completion

    req = parse_completion({"prompt": "hi", "metadata": {"tier": "gold"}}, max_model_len=512, served=("chat",))
    assert req.item("r1")["metadata"] == {"tier": "gold"}
    assert [r.metadata for r in parse_completion({"prompt": ["a", "b"], "metadata": {"tier": "gold"}},
                                                 max_model_len=512, served=("chat",)).split()] == [{"tier": "gold"}] * 2
    with pytest.raises(APIError, match="'metadata' must be an object"):
        parse_completion({"prompt": "hi", "metadata": [1]}, max_model_len=512, served=("chat",))


def test_the_condition_field_table_is_the_checkers():
    # docs/language.md, "Conditions": | field | type | of |, one row per field (or a few of one type)
    # the fields read by a key (`metadata.KEY`, `headers["NAME"]`) by their name
    from pipeline_dsl.conditions import FIELDS, KEYED

    text = (ROOT / "docs" / "language.md").read_text().split("### Conditions", 1)[1].split("\n\n| field |", 1)[1]
    documented = {}
    for row in text.split("\n\n", 1)[0].splitlines()[2:]:
        names, kind = row.split("|")[1:3]
        documented |= {re.sub(r'(\.KEY|\["(KEY|NAME)"\])$', "", f): kind.strip()
                       for f in re.findall(r"`(\w+(?:\.KEY|\[\"(?:KEY|NAME)\"\])?)`", names)}
    actual = {f: t for fields in FIELDS.values() for f, (t, _) in fields.items()}
    assert documented == actual | {f: k.type for f, k in KEYED.items()}


def test_the_built_in_kinds_table_names_every_parameter_with_its_default():
    # docs/language.md, "Built-in kinds": `max_queue` int 1024; … one row per kind
    from pipeline_dsl.units import normalise
    from stages.registry import default_registry, get_kind

    text = (ROOT / "docs" / "language.md").read_text().split("### Built-in kinds", 1)[1]
    rows = [re.split(r"(?<!\\)\|", r) for r in text.split("\n\n", 2)[1].splitlines()[2:]]
    assert {r[1].strip(" `") for r in rows} >= {k.name for k in default_registry().kinds() if k.source == "builtin"}
    bad = []
    for row in rows:
        kind = get_kind(row[1].strip(" `"))
        named = set(re.findall(r"`(\w+)`", row[2]))
        bad += [f"{kind.name}.{p.name} is not in the table" for p in kind.params if p.name not in named]
        for name, value in re.findall(r"`(\w+)` (?:int|float|bool|duration|size) (-?\d[\w.]*|true|false)\b", row[2]):
            default = next(p.default for p in kind.params if p.name == name)
            m = re.fullmatch(r"(-?[\d.]+)([a-zA-Z]+)", value)
            said = {"true": True, "false": False}.get(value) if value in ("true", "false") else \
                normalise(float(m.group(1)), m.group(2)) if m else float(value)
            if said != default:
                bad.append(f"{kind.name}.{name}: the table says {value}, the kind {default!r}")
        for name, value in re.findall(r"`(\w+)` \w+(?:\\\|\w+)+ \((\w+)[;:)]", row[2]):   # `reuse` prefix\|none (prefix)
            default = next(p.default for p in kind.params if p.name == name)
            if value != default:
                bad.append(f"{kind.name}.{name}: the table says {value}, the kind {default!r}")
    assert not bad, "\n".join(bad)


def test_the_built_in_kinds_table_gives_each_kinds_item_types_and_resource():
    # docs/language.md, "Built-in kinds": | `kv_lookup` | … | Tokens → CachedTokens | copy |, as
    # `agp stages` lists them (a route's outputs: "the same" as what it received)
    from stages.registry import get_kind

    text = (ROOT / "docs" / "language.md").read_text().split("### Built-in kinds", 1)[1]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", r)] for r in text.split("\n\n", 2)[1].splitlines()[2:]]

    def ports(ports) -> set[str]:
        return {t for port in ports for t in port.types} or {"–"}

    bad = []
    for row in rows:
        kind = get_kind(row[1].strip("`"))
        said_in, _, said_out = row[3].replace("\\|", "|").partition(" → ")
        said_in = {t.strip() for t in said_in.split("|")}
        said_out = said_in if said_out == "the same" else {t.strip() for t in said_out.split("|")}
        if (said_in, said_out) != (ports(kind.inputs), ports(kind.outputs)):
            bad.append(f"{kind.name}: the table says {row[3]}, the kind "
                       f"{'|'.join(sorted(ports(kind.inputs)))} → {'|'.join(sorted(ports(kind.outputs)))}")
        if row[4] != kind.resource:
            bad.append(f"{kind.name}: the table says {row[4]}, the kind's resource is {kind.resource}")
    assert len(rows) >= 10 and not bad, "\n".join(bad)


def test_the_modes_table_is_the_presets():
    # docs/language.md, "Modes": | mode | `generate.dtype` | `dynamic_batch.max_batch_size` | … | for |
    from pipeline_dsl.modes import PRESETS
    from pipeline_dsl.units import normalise

    lines = (ROOT / "docs" / "language.md").read_text().split("## Modes", 1)[1].split("\n| mode |", 1)[1].splitlines()
    columns = [tuple(c.strip(" `").split(".")) for c in lines[0].split("|")[:-2]]
    table = {}
    for row in lines[2:]:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.split("|")[1:-2]]
        values = {}
        for key, cell in zip(columns, cells[1:]):
            word = cell.split()[0].strip("`")
            m = re.fullmatch(r"(\d+)([A-Za-z]+)", word)
            values[key] = normalise(float(m.group(1)), m.group(2)) if m else \
                {"true": True, "false": False}.get(word, int(word) if word.isdigit() else word)
        table[cells[0].strip("`")] = values
    assert table == PRESETS


def test_the_serve_limits_table_states_the_flags_defaults():
    # docs/serve.md, "Limits": | `--max-body-bytes` | 4 MiB | 413 |
    parser = build_parser(["serve"]).commands["serve"]
    defaults = {f: a.default for a in parser._actions for f in a.option_strings}
    table = (ROOT / "docs" / "serve.md").read_text().split("## Limits", 1)[1].split("\n\n", 2)[1]
    checked = 0
    for row in table.splitlines()[2:]:
        flag, default = (c.strip() for c in row.split("|")[1:3])
        m = re.fullmatch(r"`(--[a-z-]+)`", flag)
        n = re.match(r"([\d,.]+) ?(MiB|KiB|s\b)?", default)
        if m and n:
            said = float(n.group(1).replace(",", "")) * {"MiB": 1 << 20, "KiB": 1 << 10}.get(n.group(2), 1)
            assert said == defaults[m.group(1)], \
                f"serve.md: {m.group(1)} defaults to {default}; agp serve: {defaults[m.group(1)]}"
            checked += 1
    assert checked >= 5


def test_no_page_points_outside_the_repository():
    # `../shared/NOTES.md` from docs/ is no file a reader of the repository has (a snippet's
    # `use "../common/edge.agp"` is the reader's own layout: code blocks are left out)
    bad = []
    for page in DOCS:
        prose = FENCE.sub("", page.read_text())
        for ref in re.findall(r"(?<![\w/.])((?:\.\./)+[\w./-]+\.\w+)", prose):
            target = (page.parent / ref).resolve()
            if not (target.is_relative_to(ROOT) and target.exists()):
                bad.append(f"{page.name}: {ref}")
    assert not bad, f"the docs point at files outside the repository or missing: {bad}"


def test_every_test_the_docs_cite_exists():
    # `test_hostile.py`, tests/test_serve.py::test_hundred_clients_…: a reader runs what the page names
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= {path.stem} | set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    cited = {name for page in DOCS for name in re.findall(r"\b(test_[a-z0-9_]+)\b", page.read_text())}
    assert len(cited) > 20
    assert not cited - defined, f"the docs cite tests that do not exist: {sorted(cited - defined)}"


def test_every_request_body_the_docs_send_is_one_agp_serve_takes():
    # README.md and the serve pages: `curl -s localhost:8000/v1/chat/completions … -d '{"messages": …}'`
    from pipeline_dsl.serve.protocol import parse_chat, parse_completion

    parse = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
    served = (pipeline_dsl.load_pipeline_graph(str(ROOT / "examples" / "chat.agp")).graph["name"],)
    sent = []
    for page in DOCS:
        for body in blocks(page, "sh"):
            for call in re.findall(r"curl [^\n]*?(/v1/[\w/]+)[^\n]*?(?:\\\n[^\n]*?)*?-d '([^']*)'", body):
                sent.append(call)
                parse[call[0]](json.loads(call[1]), max_model_len=8192, served=served)
    assert len(sent) >= 3


def test_the_tours_commands_that_need_no_model_do_what_the_readme_says(tmp_path, monkeypatch, capsys):
    # README.md, "A five-minute tour": `agp check examples/chat.agp  # exit 0: clean`, the error
    # files exit 2, `fmt --check` finds every example in canonical layout, `render` writes its file,
    # `plan` and `stages` print; run as shown, from the repository's root (globs expanded as a shell does)
    import glob
    import shutil

    from pipeline_dsl.cli import main

    monkeypatch.chdir(ROOT)
    model_free = {"check", "fmt", "render", "plan", "stages"}
    tour = [argv for argv in command_lines(ROOT / "README.md") if argv[0] in model_free]
    assert {argv[0] for argv in tour} == model_free
    for argv in tour:
        if argv[0] == "render":
            if shutil.which("dot") is None:
                continue                                     # graphviz draws it (README: `make demo` installs it)
            out = argv[argv.index("-o") + 1]
            argv = [*argv[:argv.index("-o")], "-o", str(tmp_path / out)]
        argv = [w for word in argv for w in (sorted(glob.glob(word)) if "*" in word else [word])]
        code = main(argv)
        printed = capsys.readouterr()
        errors = any(w.startswith("examples/errors/") for w in argv)
        assert code == (2 if errors else 0), f"agp {' '.join(argv)} exited {code}:\n{printed.err[-2000:]}"
        if argv[0] == "render":
            assert (tmp_path / out).stat().st_size > 0
        elif argv[0] in ("plan", "stages"):
            assert printed.out.strip()


def test_the_stage_kind_the_architecture_page_writes_checks_and_runs(tmp_path, monkeypatch):
    # docs/architecture.md, "writing a stage kind": its my_pkg/stages.py, registered by its
    # `agp.stages` entry point, makes a kind that `check` accepts with its parameters and that
    # treats an answer as the page says (cut to `words` words; one naming `banned` refused)
    import importlib.metadata

    from stages import registry

    page = ROOT / "docs" / "architecture.md"
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "stages.py").write_text(
        next(b for b in blocks(page, "python") if b.startswith("# my_pkg/stages.py")))
    monkeypatch.syspath_prepend(str(tmp_path))
    name, value = re.search(r'^(\w+) = "([\w.:]+)"$', next(b for b in blocks(page, "toml") if "agp.stages" in b),
                            re.M).groups()

    class EntryPoints(list):
        def select(self, group):
            return EntryPoints(e for e in self if e.group == group)

    eps = EntryPoints([importlib.metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP)])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None, **kw: eps if group is None
                        else eps.select(group))
    registry.reset_default_registry()
    try:
        text = ("pipeline p {\n    stage request : requests {}\n    stage batch : dynamic_batch {}\n"
                "    stage encode : encode {}\n    stage kv : kv_lookup {}\n    stage gen : generate {}\n"
                f"    stage cut : {name} {{ words = 3  banned = \"zzz\" }}\n    stage out : respond {{}}\n"
                "    request -> batch -> encode -> kv -> gen -> cut -> out\n}\n")
        _, diags = pipeline_dsl.loads(text, file=str(tmp_path / "p.agp"))
        assert [d.message for d in diags] == [] and not registry.default_registry().problems
        module, _, cls = registry.get_kind(name).impl.partition(":")
        stage = getattr(importlib.import_module(module), cls)("cut", {"words": 3, "banned": "zzz"}, None)
    finally:
        registry.reset_default_registry()
    assert stage.process({"text": "one two three four"})["text"] == "one two three"
    with pytest.raises(pipeline_dsl.Reject, match="zzz"):
        stage.process({"text": "a zzz b"})


def banner_shape(line: str) -> str:
    """A startup line with its values left out: numbers, names, the model's file, what runs its
    linears (the weights' form, the kernels, the compute dtype), whether OpenMP waits passively (it depends on the machine's load)."""
    line = re.sub(r"^\S+ INFO agp\.serve: ", "", line)
    line = re.sub(r"; OpenMP waits \w+", "", line)
    line = re.sub(r"model \S+ \(.* weights on .*, \w+ (compute|storage)\) on ", "model M (W weights on K, D) on ", line)
    line = re.sub(r"'[^']*'", "'NAME'", re.sub(r"https?://\S+", "URL", line))
    return re.sub(r"\b(thread|CPU)s\b", r"\1", re.sub(r"\d+", "N", line))


def test_the_startup_banner_the_serve_page_quotes_is_the_one_agp_serve_prints(tmp_path, tiny_gguf):
    # docs/serve.md, "Running it like vLLM": the three lines, here for examples/chat.agp on the
    # tiny model; every clause the page shows is printed, in its order, and no other
    import argparse

    from pipeline_dsl.commands.serve import banner
    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    quoted = next(b for b in blocks(ROOT / "docs" / "serve.md", "") if "INFO agp.serve: agp " in b).splitlines()
    path = tmp_path / "chat.agp"
    path.write_text((ROOT / "examples" / "chat.agp").read_text().replace('"smollm2-135m-instruct"', f'"{tiny_gguf}"'))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([str(path), "--threads", "1", "--dtype", "fp32"])
    args.open_files = 65536                                  # what `agp serve` raised the limit to
    serving = build(args)
    try:
        printed = banner(serving, "http://127.0.0.1:8000/v1", args)
    finally:
        serving.runtime.close()
    assert [banner_shape(line) for line in quoted] == [banner_shape(line) for line in printed]


def test_the_serve_limits_table_names_every_host_answered_by_default():
    # docs/serve.md, "Limits": | `--allowed-hosts` | the address listened on, `localhost`, ... (any
    # when listening on `0.0.0.0` or `::`); ... | — it said "the address listened on and localhost"
    # while 127.0.0.1 and ::1 are answered too; --help says the same names
    from pipeline_dsl.serve.build import allowed_hosts

    row = next(ln for ln in (ROOT / "docs" / "serve.md").read_text().splitlines()
               if ln.startswith("| `--allowed-hosts` |"))
    named, anywhere = row.split("|")[2].split(";", 1)[0].split("(any when listening on")
    address = "10.1.2.3"
    assert set(allowed_hosts(address, None)) == {address, *re.findall(r"`([^`]+)`", named)}, row
    listening_anywhere = re.findall(r"`([^`]+)`", anywhere)
    assert listening_anywhere and all(allowed_hosts(h, None) == ("*",) for h in listening_anywhere), row
    parser = build_parser(["serve"]).commands["serve"]
    said = next(a.help for a in parser._actions if "--allowed-hosts" in a.option_strings)
    for host in (*allowed_hosts(address, None)[1:], *listening_anywhere):
        assert re.search(rf"(?<![\w:.]){re.escape(host)}(?![\w:.])", said), (host, said)


def section(page: str, title: str) -> str:
    """The text of one `## title` section of a page, up to the next `## `."""
    text = (ROOT / "docs" / page).read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def error_codes_of_the_server() -> set[str]:
    """Every `code` an error answer of agp serve (or `agp run`'s error record) may carry, as the
    source writes it: `code="..."`, `"code": "..."`, a `CODE = "..."` constant, a refusal of the
    HTTP layer, and the codes of the one table from a pipeline's failures to its answer."""
    from pipeline_dsl.serve.errors import FAILURES

    codes = {code for _, _, code, _ in FAILURES.values() if code}
    for path in [*sorted((ROOT / "pipeline_dsl" / "serve").glob("*.py")), ROOT / "pipeline_dsl" / "requests_io.py",
                 ROOT / "pipeline_dsl" / "flow" / "items.py"]:    # the runtime's own: answer_failed
        text = path.read_text()
        codes |= set(re.findall(r'\bcode="([a-z_]+)"', text)) | set(re.findall(r'"code": "([a-z_]+)"', text))
        codes |= set(re.findall(r'^\s*[A-Z_]*(?:CODE|PARAMETERS) = "([a-z_]+)"', text, re.M))
        codes |= set(re.findall(r'_refuse\(\d+, .*?"([a-z_]+)"\)', text, re.S))
    return codes


def test_the_serve_error_table_names_every_error_code_the_server_answers():
    # docs/serve.md, "Errors": a client (or an alert) that branches on `error.code` finds every
    # code there, and the table names no code the server never sends. It named none of
    # `queue_full` (429), `overloaded` (503), `body_too_large` (413), `unsupported_media_type`
    # (415), `invalid_host`, `response_not_found`, `tracing_off`, `loading`, ...
    table = "\n".join(ln for ln in section("serve.md", "Errors").splitlines() if ln.startswith("| "))
    named = set(re.findall(r"`code: ([a-z_]+)`", table))
    server = error_codes_of_the_server()
    assert {"queue_full", "grammar_checks_busy", "headers_too_large", "invalid_function_parameters"} <= server
    assert not server - named, f"serve.md's Errors table lacks the codes {sorted(server - named)}"
    assert not named - server, f"serve.md's Errors table names codes agp serve never sends: {sorted(named - server)}"


def test_the_metric_names_of_the_serve_page_are_the_families_metrics_exports(tmp_path, tiny_gguf):
    # docs/serve.md, "Metrics": every family `GET /metrics` answers (examples/chat.agp on the tiny
    # model, before any request) is named there in full, and every `agp_…` or `vllm:…` name the
    # page gives is one of them (a histogram's or counter's sample names count as its own). The
    # page named none of agp_queue_length, agp_running_sequences, agp_requests_in_flight,
    # agp_prompt_tokens_cached_total, agp_prefix_cache_hit_rate, nor the stage series one by one.
    import argparse

    from pipeline_dsl.serve.build import build
    from pipeline_dsl.serve.options import add_arguments

    path = tmp_path / "chat.agp"
    path.write_text((ROOT / "examples" / "chat.agp").read_text().replace('"smollm2-135m-instruct"', f'"{tiny_gguf}"'))
    p = argparse.ArgumentParser()
    add_arguments(p)
    serving = build(p.parse_args([str(path), "--threads", "1", "--dtype", "fp32"]))
    try:
        text = serving.metrics.render(serving.runtime.stats())[0].decode()
    finally:
        serving.runtime.close()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert {"agp_stage_items_in_total", "vllm:num_requests_waiting", "process_cpu_seconds_total"} <= families
    page = (ROOT / "docs" / "serve.md").read_text()
    written = set(re.findall(r"(?<![\w:])((?:agp_|vllm:|process_)[a-z0-9_:]*[a-z0-9])", page))
    unnamed = sorted(f for f in families if f not in written)
    assert not unnamed, f"serve.md does not name the /metrics families {unnamed}"
    samples = {f + suffix for f in families for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    unknown = sorted(w for w in written if w not in samples)
    assert not unknown, f"serve.md names metrics /metrics does not export: {unknown}"


def test_the_readme_lists_every_page_of_the_docs():
    # README.md, "Documentation": a page the list leaves out is one a reader never finds from the
    # front page (docs/gpu.md, the engine on CUDA, was missing)
    listed = "\n".join(ln for ln in (ROOT / "README.md").read_text().split("\n## Documentation\n", 1)[1]
                       .split("\n## ", 1)[0].splitlines() if ln.startswith("- "))
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"`docs/{p.name}`" not in listed]
    assert not missing, f"README.md's Documentation list lacks {missing}"


def test_the_openai_page_lists_every_llama_cpp_and_ollama_field_agp_explains():
    # docs/openai.md, "Coming from llama.cpp or Ollama": each field whose 400 says what agp calls it
    # is in the page's table, so a reader finds it before sending it
    from pipeline_dsl.requests_io import LLAMA_CPP_FIELDS, OLLAMA_FIELDS

    named = set(re.findall(r"`([a-z_]+)", section("openai.md", "Coming from llama.cpp or Ollama")))
    missing = sorted((set(LLAMA_CPP_FIELDS) | set(OLLAMA_FIELDS)) - named)
    assert not missing, f"openai.md's llama.cpp and Ollama table lacks {missing}"
