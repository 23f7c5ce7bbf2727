"""agp render's DOT text (render.dot_source): what each box and edge says, as docs/language.md's
`agp render` describes it, without graphviz."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from pipeline_dsl import load_pipeline_graph
from pipeline_dsl.plan import make_plan
from pipeline_dsl.render import dot_source

PIPELINE = """
pipeline p {{
    model = "smollm2-135m-instruct"
    stage request : requests {{}}
    stage batch : dynamic_batch {{ padding = false }}
    stage encode : encode {{}}
    stage kv : kv_lookup {{}}
    stage gen : generate {{ {gen} }}
    stage out : respond {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def dot(gen: str = "", plan: bool = False) -> str:
    graph = load_pipeline_graph("<test>", text=PIPELINE.format(gen=gen))
    return dot_source(graph, make_plan(graph) if plan else None)


def test_a_box_shows_booleans_as_the_file_writes_them_and_leaves_out_empty_default_lists():
    text = dot('stop = []')
    assert "padding = false" in text and "padding = False" not in text
    assert "stop = " not in text                         # [] is the default: nothing to see
    assert "stop = [&#x27;END&#x27;]<BR/>" in dot('stop = ["END"]')                # one set is shown


def test_every_edge_is_drawn_once_from_its_source_to_its_destination():
    graph = load_pipeline_graph("<test>", text=PIPELINE.format(gen=""))
    drawn = re.findall(r'^  "(\w+)" -> "(\w+)"', dot_source(graph), re.M)
    assert sorted(drawn) == sorted([("request", "batch"), ("batch", "encode"), ("batch", "encode"),
                                    ("encode", "kv"), ("kv", "gen"), ("gen", "out")])


def test_a_stage_placed_on_a_resource_is_filled_with_that_resources_colour():
    """`on host` moves generate's work to the host: its box says so and takes the host colour."""
    text = PIPELINE.format(gen="").replace("stage gen : generate", "stage gen : generate on host")
    box = next(ln for ln in dot_source(load_pipeline_graph("<test>", text=text)).splitlines()
               if ln.startswith('  "gen" ['))
    assert "generate on host" in box and 'fillcolor="#dbeafe"' in box
    plain = next(ln for ln in dot().splitlines() if ln.startswith('  "gen" ['))
    assert 'fillcolor="#fde2e2"' in plain                  # generate's own resource: compute


def test_a_condition_label_escapes_its_backslashes_then_its_quotes():
    """The string of a condition is quoted in the DOT text: a backslash doubled, a quote escaped."""
    text = PIPELINE.format(gen="").replace(
        "request -> batch", 'request -> batch when metadata.k == "a\\"b\\\\c"\n    request -> batch otherwise')
    lines = dot_source(load_pipeline_graph("<test>", text=text)).splitlines()
    assert '  "request" -> "batch" [label="when metadata.k == \\"a\\\\\\"b\\\\\\\\c\\""];' in lines


@pytest.mark.parametrize("condition", [
    'not (prompt_tokens > 5 and metadata.k == "a") or n > 1',   # not `not a and b`: another condition
    'prompt_tokens > 5 and (n > 1 or metadata.k == "a")',       # not `a and b or c`: true for any item with c
], ids=["not-and", "or-in-and"])
def test_a_condition_label_keeps_the_parentheses_its_meaning_needs(condition):
    """A condition is drawn with the parentheses its meaning needs, none dropped."""
    text = PIPELINE.format(gen="").replace(
        "request -> batch", f"request -> batch when {condition}\n    request -> batch otherwise")
    lines = dot_source(load_pipeline_graph("<test>", text=text)).splitlines()
    label = condition.replace('"', '\\"')
    assert f'  "request" -> "batch" [label="when {label}"];' in lines


def _picking(tmp_path, routes: str) -> str:
    """The DOT text of PIPELINE with a python stage `pick` between request and batch, whose edges
    to batch are `routes` (one per line, each after `pick -> batch `)."""
    (tmp_path / "hooks.py").write_text("def pick(item):\n    return 'a'\n")
    path = tmp_path / "p.agp"
    edges = "".join(f"    pick -> batch {r}\n" for r in routes.splitlines())
    path.write_text(PIPELINE.format(gen="").replace(
        "request -> batch", 'stage pick : python { fn = "hooks:pick" }\n    request -> pick\n' + edges))
    return dot_source(load_pipeline_graph(str(path)))


def test_a_single_condition_of_a_python_stage_is_not_numbered(tmp_path):
    one = _picking(tmp_path, "when a\notherwise")
    assert '"pick" -> "batch" [label="when a"];' in one
    assert '"pick" -> "batch" [label="otherwise", style=dashed];' in one


def test_a_plans_events_between_two_stages_are_drawn_once():
    graph = load_pipeline_graph("<test>", text=PIPELINE.format(gen=""))
    plan = make_plan(graph)
    seg = plan.segments[0]
    twice = replace(plan, segments=(replace(seg, events=(*seg.events, *seg.events)),))
    assert dot_source(graph, twice).count('label="event"') == dot_source(graph, plan).count('label="event"') > 0


def test_a_plans_events_inside_one_stage_draw_no_loop_on_its_box():
    """generate's h2d -> forward -> d2h events stay within the stage: only kv -> gen joins two boxes."""
    graph = load_pipeline_graph("<test>", text=PIPELINE.format(gen=""))
    plan = make_plan(graph)
    assert any(e.src == e.dst == "gen" for e in plan.events)
    drawn = re.findall(r'^  "(\w+)" -> "(\w+)" \[style=dashed, color="#b45309"', dot_source(graph, plan), re.M)
    assert drawn == [("kv", "gen")]


def test_plan_and_render_titles_say_none_for_a_stream_that_carries_no_stage(tmp_path):
    """A copy stream carries generate's h2d and d2h copies but no stage of its own: `agp plan`
    listed its stages as '-' and `agp render --plan`'s title as 'short_gen/copy:  |' (nothing
    after the colon); both now say "none", and list the stages of the others alike."""
    from clikit import ROOT, agp_in

    example = ROOT / "examples" / "router.agp"
    plan = agp_in("plan", example)
    assert plan.returncode == 0, plan.stderr
    dot = tmp_path / "router.dot"
    drawn = agp_in("render", "--plan", example, "-o", dot)
    assert drawn.returncode == 0, drawn.stderr
    title = re.search(r'label="pipeline router  —  streams: ([^"]*)";', dot.read_text()).group(1)
    legend = dict(part.split(": ", 1) for part in title.split(" | "))
    listed = dict(re.findall(r"^stream (\S+) \(\w+\): stages (.*)$", plan.stdout, re.M))
    assert legend == listed and len(listed) == 6
    assert legend["short_gen/copy"] == legend["long_gen/copy"] == "none"
    assert legend["short_gen/compute"] == "short_gen"
    assert all(v.strip() and v != "-" for v in legend.values()), legend


ODD = ["\x00", "\x01", "\x08", "\x1b", "\x7f", "\ufffe", "\uffff", "\t"]   # what a file's escapes can put in a string


def test_control_characters_and_noncharacters_of_a_files_strings_are_drawn_escaped():
    """A string of the file (a system prompt, a condition's literal) may hold any character
    its escapes spell; the DOT text shows each one neither DOT nor a label's XML can hold as the file
    spells it, so that `dot` draws it instead of failing."""
    for ch in ODD:
        esc = {"\x00": "\\0", "\t": "\\t"}.get(ch, f"\\u{ord(ch):04x}")     # the file's own spelling
        text = PIPELINE.format(gen="").replace(
            "request -> batch",
            f'stage sys : system_prompt {{ text = "be{esc}brief" }}\n'
            f'    request -> sys\n    sys -> batch when metadata.k == "a{esc}b"\n    sys -> batch otherwise')
        graph = load_pipeline_graph("<test>", text=text)
        assert graph.nodes["sys"]["params"]["text"] == f"be{ch}brief"    # the value itself keeps it
        out = dot_source(graph)
        assert ch not in out.replace("\n", ""), repr(ch)
        shown = esc.replace("\\", "\\\\")                               # inside a DOT quoted string
        assert f"text = be{esc}brief" in out                             # a box: HTML, no DOT escaping
        assert f'label="when metadata.k == \\"a{shown}b\\""' in out


def test_the_conditions_a_stage_tries_in_order_are_numbered_from_two_on(tmp_path):
    """A stage with two conditional routes tries them in order: the edges say which first."""
    text = _picking(tmp_path, "when a\nwhen b\notherwise")
    assert '"pick" -> "batch" [label="1. when a"];' in text
    assert '"pick" -> "batch" [label="2. when b"];' in text
    assert '"pick" -> "batch" [label="otherwise", style=dashed];' in text


def _fills(text: str) -> dict:
    return dict(re.findall(r'^  "(\w+)" \[label=.*fillcolor="(#\w+)"', text, re.M))


def test_with_a_plan_each_box_takes_its_streams_colour():
    """`agp render --plan` colours stages by plan stream: the stages of one stream share a fill,
    those of two streams differ, and a per-item stage (on no stream) stays grey."""
    graph = load_pipeline_graph("<test>", text=PIPELINE.format(gen=""))
    plan = make_plan(graph)
    fills = _fills(dot_source(graph, plan))
    stream = {st: s.name for s in plan.streams for st in s.stages}
    assert fills["request"] == "#eeeeee" and "request" not in stream
    on = sorted(n for n in fills if n in stream)
    assert len({stream[n] for n in on}) >= 2
    for a in on:
        for b in on:
            assert (fills[a] == fills[b]) == (stream[a] == stream[b]), (a, b)
    assert all(fills[n] != "#eeeeee" for n in on)


def test_the_title_names_the_pipelines_model_mode_and_device():
    text = PIPELINE.format(gen="").replace('model = "smollm2-135m-instruct"',
                                           'model = "smollm2-135m-instruct"\n    mode = balanced\n    device = cpu')
    title = re.search(r'^  label="(.*)";$', dot_source(load_pipeline_graph("<test>", text=text)), re.M).group(1)
    assert title == "pipeline p  (model = smollm2-135m-instruct, mode = balanced, device = cpu)"


def test_a_box_shows_its_kinds_key_settings_and_those_changed_from_the_default_alone():
    """A generate box shows its key settings and a setting the file changed (top_p), not every
    other setting at its default."""
    box = next(ln for ln in dot("top_p = 0.5").splitlines() if ln.startswith('  "gen" ['))
    assert "top_p = 0.5" in box and "max_new_tokens = " in box
    assert "top_k = " not in box and "repetition_penalty" not in box


def test_a_box_leaves_out_a_key_setting_left_unset_and_shows_it_once_set(tmp_path):
    """A python stage without max_turns (no bound) draws no 'max_turns = none'; one with it shows it."""
    (tmp_path / "hooks.py").write_text("def f(item):\n    return item\n")

    def box(settings: str) -> str:
        path = tmp_path / "p.agp"
        path.write_text(PIPELINE.format(gen="").replace(
            "    request -> batch\n", '    stage f : python { fn = "hooks:f" ' + settings + ' }\n'
                                      '    request -> f -> batch\n'))
        return next(ln for ln in dot_source(load_pipeline_graph(str(path))).splitlines() if ln.startswith('  "f" ['))

    assert "fn = hooks:f" in box("") and "max_turns" not in box("") and "= none" not in box("")
    assert "max_turns = 3" in box("max_turns = 3")


def test_a_box_shows_durations_and_sizes_in_units_as_the_file_writes_them():
    """A batcher's timeout reads 20ms and a KV budget 64MiB, not the seconds and bytes they hold."""
    text = (PIPELINE.format(gen="").replace("padding = false", "padding = false  timeout = 20ms")
            .replace("stage kv : kv_lookup {}", "stage kv : kv_lookup { budget = 64MiB }"))
    boxes = {ln.split('"')[1]: ln for ln in dot_source(load_pipeline_graph("<test>", text=text)).splitlines()
             if ln.startswith('  "') and "[label=<" in ln}
    assert "timeout = 20ms<BR/>" in boxes["batch"] and "0.02" not in boxes["batch"]
    assert "budget = 64MiB</FONT>" in boxes["kv"] and "67108864" not in boxes["kv"]


def test_the_title_of_a_derived_pipeline_names_the_pipeline_it_copies():
    """`pipeline chat_no_reuse : chat` is drawn under the title `pipeline chat_no_reuse : chat`."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "compare.agp"
    graph = load_pipeline_graph(str(path), "chat_no_reuse")
    title = re.search(r'^  label="([^"]*)";$', dot_source(graph), re.M).group(1)
    assert title.startswith("pipeline chat_no_reuse : chat  (")
