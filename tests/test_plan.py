"""The stream planner: streams by resource, events on cross-stream edges, overlap, `agp plan`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from clikit import agp_in
from pipeline_dsl.plan import (Plan, PlanError, busy_overlap, format_plan, instance_graph,
                               make_plan, stage_work, step_graph)

KIND_RESOURCE = {"requests": "host", "dynamic_batch": "host", "encode": "host",
                 "kv_lookup": "copy", "generate": "compute", "respond": "host",
                 "route": "host", "python": "host"}
CHAT = [("request", "requests"), ("batch", "dynamic_batch"), ("encode", "encode"),
        ("kv", "kv_lookup"), ("gen", "generate"), ("out", "respond")]
ROOT = Path(__file__).resolve().parents[1]
SEG = ("batch", "encode", "kv", ("gen",))      # the chat graph's engine segment


def graph(stages=CHAT, edges=None, placement=None):
    """A stage graph with the attributes graph.build_graph gives (docs/architecture.md)."""
    g = nx.DiGraph(name="chat", settings={})
    for name, kind in stages:
        g.add_node(name, kind=kind, params={}, pos=None, resource=KIND_RESOURCE.get(kind, "host"),
                   placement=(placement or {}).get(name))
    if edges is None:
        nx.add_path(g, [name for name, _ in stages])
    else:
        g.add_edges_from(edges)
    return g


def test_host_copy_and_compute_work_each_get_their_own_stream():
    plan = make_plan(graph())
    assert [(s.name, s.resource) for s in plan.streams] == [
        ("host", "host"), ("copy", "copy"), ("compute", "compute")]
    on = {w.name: w.stream for w in plan.work}
    assert on["gen.forward"] == "compute"
    assert on["gen.h2d"] == on["gen.d2h"] == "copy"
    assert on["batch.admit"] == on["batch.schedule"] == on["kv.lookup"] == on["gen.emit"] == "host"
    # per request, off the engine loop: admission, tokenisation, the answer
    assert [w.name for w in plan.items] == ["request.admit", "encode.tokenise", "out.respond"]


def test_every_engine_stage_is_listed_on_exactly_one_stream_the_others_per_item():
    plan = make_plan(graph())
    listed = [s for st in plan.streams for s in st.stages]
    assert sorted(listed) == ["batch", "encode", "gen", "kv"]
    # docs/plan.md: a stream lists its stages in step order, encode riding right after its batcher
    assert plan.streams[0].stages == ("batch", "encode", "kv")
    assert plan.stream_of("gen") == "compute" and plan.stream_of("kv") == "host"
    assert {w.stage for w in plan.items} == {"request", "encode", "out"}
    assert plan.segments[0].stages == ("batch", "encode", "kv", "gen")


def test_generate_is_split_into_input_copy_forward_and_token_copy():
    parts = [(part, res) for _, stage, part, res, _ in stage_work(graph(), SEG) if stage == "gen"]
    assert parts == [("h2d", "copy"), ("forward", "compute"), ("d2h", "copy"), ("emit", "host")]


def test_events_sit_only_on_cross_stream_edges_and_are_not_redundant():
    plan = make_plan(graph())
    pairs = {(e.src_work, e.dst_work) for e in plan.events}
    assert pairs == {("kv.lookup", "gen.h2d"), ("gen.h2d", "gen.forward"),
                     ("gen.forward", "gen.d2h"), ("gen.d2h", "gen.emit")}
    stream = {w.name: w.stream for w in plan.work}
    assert all(stream[e.src_work] != stream[e.dst_work] for e in plan.events)
    # batch.schedule -> kv.lookup is a dependency, but both are on the host stream: no event
    assert ("batch.schedule", "kv.lookup") not in pairs


def test_only_the_host_waiting_for_sampled_tokens_is_a_host_sync():
    plan = make_plan(graph())
    assert [(e.src_work, e.dst_work) for e in plan.events if e.host_sync] == [("gen.d2h", "gen.emit")]


def test_work_after_the_compute_stream_is_issued_one_micro_batch_later():
    plan = make_plan(graph())
    skew = {w.name: w.skew for w in plan.work}
    assert skew["gen.forward"] == 0 and skew["gen.h2d"] == 0
    assert skew["gen.d2h"] == 1 and skew["gen.emit"] == 1
    copy = next(s for s in plan.streams if s.name == "copy")
    # the next step's input copy is queued before this step's token copy
    assert copy.work.index("gen.h2d") < copy.work.index("gen.d2h")


def test_the_report_shows_work_issued_later_as_the_micro_batch_it_belongs_to():
    """A work of skew 1 runs the previous micro-batch's piece: the report reads (micro-batch k-1)."""
    plan = make_plan(graph())
    lines = format_plan(plan).splitlines()
    row = {line.split()[0]: line for line in lines if line.startswith("  ") and " cost " in line}
    assert row["gen.d2h"].endswith("(micro-batch k-1)") and row["gen.emit"].endswith("(micro-batch k-1)")
    assert "micro-batch" not in row["gen.forward"] and "micro-batch" not in row["batch.schedule"]


def test_a_tie_between_the_host_and_the_compute_load_keeps_the_forward_the_bottleneck():
    """Measured costs that load the host stream as much as the forward: work after the forward is
    still what is issued a micro-batch later, not the forward itself (after the host's work)."""
    tied = make_plan(graph(), costs={"gen.forward": 1.0, "batch.schedule": 1.0})
    skew = {w.name: w.skew for w in tied.work}
    assert skew["gen.forward"] == skew["gen.h2d"] == 0
    assert skew["gen.d2h"] == skew["gen.emit"] == 1


def test_explicit_placement_wins_over_the_kind():
    plan = make_plan(graph(placement={"gen": "compute", "kv": "copy"}))
    on = {w.name: w.stream for w in plan.work}
    assert on["gen.h2d"] == on["gen.d2h"] == on["gen.emit"] == "compute"
    assert on["kv.lookup"] == "copy"
    assert [s.name for s in plan.streams] == ["host", "copy", "compute"]
    assert plan.stream_of("kv") == "copy"


def test_everything_on_one_stream_predicts_no_overlap_and_needs_no_events():
    placement = {name: "host" for name, _ in CHAT}
    plan = make_plan(graph(placement=placement))
    assert len(plan.streams) == 1 and plan.events == ()
    assert plan.overlap == 0.0 and plan.speedup == pytest.approx(1.0)


def test_predicted_overlap_beats_nimbles_plan_with_fewer_events():
    plan = make_plan(graph())
    assert 0.25 < plan.overlap < 1.0 and plan.speedup > 1.25   # host + copy work hidden under the forward
    assert plan.baseline.method == "nimble"
    assert plan.baseline.streams > len(plan.streams)
    assert plan.baseline.events_per_step > len(plan.events)
    assert plan.overlap > plan.baseline.overlap


def test_the_stream_count_does_not_grow_with_the_window():
    small, big = make_plan(graph(), window=6), make_plan(graph(), window=20)
    assert [s.work for s in small.streams] == [s.work for s in big.streams]
    assert small.events == big.events
    assert big.baseline.streams >= small.baseline.streams


def test_the_window_needs_at_least_four_micro_batches():
    assert make_plan(graph(), window=4).segments
    with pytest.raises(PlanError, match="the window needs at least 4 micro-batches"):
        make_plan(graph(), window=3)


def test_the_report_shows_an_event_on_the_previous_micro_batch_as_k_minus_1():
    """An event of lag 1 (the waiter of micro-batch k waits on the recorder of k-1) reads [k-1]."""
    from dataclasses import replace

    from pipeline_dsl.plan import PipelinePlan

    plan = make_plan(graph())
    seg = plan.segments[0]
    lagged = replace(seg, events=(replace(seg.events[0], lag=1), *seg.events[1:]))
    text = format_plan(PipelinePlan(plan.pipeline, plan.items, (lagged,)))
    first = seg.events[0]
    assert f"  {first.src_work}[k-1] -> {first.dst_work}[k]   (stream waits)" in text.splitlines()
    assert f"  {first.src_work}[k] -> {first.dst_work}[k]" in format_plan(plan)


def test_instance_graph_links_each_work_to_its_previous_micro_batch():
    g = graph()
    step = step_graph(g, stage_work(g, SEG))
    inst = instance_graph(step, 3)
    assert inst.has_edge(("gen.forward", 0), ("gen.forward", 1))
    assert inst.has_edge(("gen.h2d", 2), ("gen.forward", 2))
    assert not inst.has_edge(("gen.forward", 0), ("gen.h2d", 1))
    assert inst.number_of_nodes() == 3 * step.number_of_nodes()


def test_a_fork_pipeline_with_two_generators_plans_and_orders_both():
    stages = CHAT[:4] + [("gen_a", "generate"), ("gen_b", "generate"), ("out", "respond")]
    edges = [("request", "batch"), ("batch", "encode"), ("encode", "kv"), ("kv", "gen_a"),
             ("kv", "gen_b"), ("gen_a", "out"), ("gen_b", "out")]
    plan = make_plan(graph(stages, edges))
    compute = next(s for s in plan.streams if s.name == "compute")
    assert set(compute.stages) == {"gen_a", "gen_b"}         # one engine: one forward serves both
    assert {e.dst_work for e in plan.events if e.host_sync} == {"gen_a+gen_b.emit"}


def test_two_engine_segments_get_streams_of_their_own():
    stages = [("request", "requests"), ("route", "route"), ("b1", "dynamic_batch"), ("e1", "encode"),
              ("k1", "kv_lookup"), ("g1", "generate"), ("b2", "dynamic_batch"), ("e2", "encode"),
              ("k2", "kv_lookup"), ("g2", "generate"), ("out", "respond")]
    edges = [("request", "route"), ("route", "b1"), ("route", "b2"), ("b1", "e1"), ("e1", "k1"), ("k1", "g1"),
             ("b2", "e2"), ("e2", "k2"), ("k2", "g2"), ("g1", "out"), ("g2", "out")]
    plan = make_plan(graph(stages, edges))
    assert [p.segment for p in plan.segments] == ["g1", "g2"]
    # the report's header counts the events of every segment, not the first's alone
    assert len(plan.events) == sum(len(p.events) for p in plan.segments) > len(plan.segments[0].events)
    assert format_plan(plan).splitlines()[0] == \
        f"pipeline chat: 2 engine segments, 6 streams, {len(plan.events)} events per micro-batch"
    assert [s.name for s in plan.segments[1].streams] == ["g2/host", "g2/copy", "g2/compute"]
    assert [w.name for w in plan.items] == ["request.admit", "route.route", "e1.tokenise", "e2.tokenise",
                                            "out.respond"]


def test_an_unknown_kind_runs_per_item():
    stages = CHAT[:5] + [("judge", "third_party"), ("out", "respond")]
    plan = make_plan(graph(stages))
    assert "judge.run" in [w.name for w in plan.items]


def test_a_loop_through_request_stages_still_plans():
    stages = CHAT + [("tool", "python")]
    edges = [("request", "batch"), ("batch", "encode"), ("encode", "kv"), ("kv", "gen"), ("gen", "tool"),
             ("tool", "batch"), ("tool", "out")]
    plan = make_plan(graph(stages, edges))
    assert "tool.call" in [w.name for w in plan.items] and len(plan.segments) == 1


def test_a_broken_segment_is_a_plan_error():
    g = graph(edges=[("request", "batch"), ("batch", "kv"), ("kv", "gen"), ("gen", "out")])
    with pytest.raises(PlanError, match="not in one batch -> encode -> kv_lookup -> generate chain"):
        make_plan(g)


def test_plan_is_frozen_and_round_trips_through_json():
    plan = make_plan(graph())
    data = json.loads(plan.to_json())
    assert [s["name"] for s in data["streams"]] == ["host", "copy", "compute"]
    assert {"src", "dst", "src_work", "dst_work", "lag", "host_sync"} <= set(data["events"][0])
    assert isinstance(plan.segments[0], Plan)
    with pytest.raises(AttributeError):
        plan.overlap = 1.0


def test_format_plan_names_streams_events_and_overlap():
    text = format_plan(make_plan(graph()))
    assert "stream compute (compute): stages gen" in text
    assert "gen.d2h[k] -> gen.emit[k]   (host waits)" in text
    assert "request.admit  encode.tokenise  out.respond" in text
    assert "predicted steady-state overlap" in text and "Nimble" in text


def test_the_plan_shows_the_next_steps_host_work_beside_the_current_forward():
    seg = make_plan(graph()).segments[0]
    assert seg.anchor == "gen.forward"
    assert {"batch.schedule[k+1]", "kv.lookup[k+1]", "gen.h2d[k+1]", "gen.emit[k-1]"} <= set(seg.beside)
    text = format_plan(make_plan(graph()))
    assert "while gen.forward[k] computes" in text and "batch.schedule[k+1]" in text
    serial = make_plan(graph(placement={n: "compute" for n, _ in CHAT})).segments[0]
    assert serial.beside == ()                            # one stream: nothing runs beside it


def test_the_pipeline_plan_answers_every_field_its_json_has_at_the_top():
    # docs/plan.md: plan.anchor and plan.beside, as `agp plan --json` prints them at the top level
    plan = make_plan(graph())
    data = plan.to_dict()
    assert (plan.anchor, plan.beside) == (data["anchor"], data["beside"]) == \
        (plan.segments[0].anchor, plan.segments[0].beside)
    empty = make_plan(graph(stages=[("request", "requests"), ("out", "respond")]))
    assert (empty.anchor, empty.beside) == ("", ())


def test_busy_overlap_counts_time_with_two_or_more_streams_busy():
    spans = {"a": [(0.0, 4.0)], "b": [(2.0, 6.0), (5.0, 7.0)], "c": [(9.0, 10.0)]}
    assert busy_overlap(spans, 0.0, 10.0) == pytest.approx(0.2)
    assert busy_overlap(spans, 3.0, 5.0) == pytest.approx(0.5)
    assert busy_overlap({"a": [(0, 1)]}, 0, 1) == 0.0


def _agp_plan(*argv):
    code = ("import sys; from pipeline_dsl.commands import plan; import argparse;"
            "p = argparse.ArgumentParser(); plan.add_arguments(p);"
            "rc = plan.main(p.parse_args(sys.argv[1:]));"
            "assert 'torch' not in sys.modules, 'agp plan imported torch'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_agp_plan_prints_the_streams_of_the_chat_example_without_torch():
    r = _agp_plan("examples/chat.agp")
    assert r.returncode == 0, r.stderr
    assert "stream compute" in r.stdout and "events" in r.stdout and "overlap" in r.stdout


def test_agp_plan_json_has_a_top_level_streams_list():
    r = _agp_plan("examples/chat.agp", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {s["resource"] for s in data["streams"]} >= {"host", "compute"}
    assert 0.0 <= data["overlap"] <= 1.0


def test_agp_plan_on_a_missing_file_is_a_clean_error(tmp_path):
    r = _agp_plan(str(tmp_path / "nope.agp"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip()


def test_measured_costs_replace_the_nominal_ones_in_the_prediction():
    # host and copy work that is tiny beside the forward leaves almost nothing to hide
    measured = {"gen.forward": 0.627, "batch.schedule": 0.0003, "gen.emit": 0.0008,
                "gen.h2d": 0.0015, "kv.lookup": 0.0001}
    plan = make_plan(graph(), costs=measured)
    assert plan.work_named("gen.forward").cost == 0.627
    assert 1.0 < plan.speedup < 1.01 and plan.overlap < 0.01
    assert make_plan(graph()).speedup > 1.25


def test_measured_costs_of_no_work_predict_no_overlap_and_no_speedup():
    """`make_plan(graph, costs=trace.costs())` of a trace that holds no engine step: every work
    costs nothing, so nothing overlaps and nothing is gained (it divided zero by zero)."""
    for measured in ({}, {"gen.forward": 0.0}):
        plan = make_plan(graph(), costs=measured)
        assert plan.overlap == 0.0 and plan.speedup == 1.0
        assert {w.cost for w in plan.work} == {0.0}


def test_agp_plan_json_of_a_derived_pipeline_names_its_base_and_the_report_its_figures():
    """A derived pipeline's plan says which pipeline it copies, in --json as in the report; the
    report's overlap and speedup are the plan's own figures."""
    from pipeline_dsl import load_pipeline_graph

    r = agp_in("plan", "examples/compare.agp", "--pipeline", "chat_no_reuse", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["pipeline"], data["base"]) == ("chat_no_reuse", "chat")
    plan = make_plan(load_pipeline_graph(str(ROOT / "examples" / "chat.agp")))
    seg = plan.segments[0]
    assert seg.speedup != seg.overlap
    assert (f"predicted steady-state overlap {seg.overlap:.2f} of wall time with >= 2 streams busy; "
            f"speedup {seg.speedup:.2f}x over serial") in format_plan(plan)
