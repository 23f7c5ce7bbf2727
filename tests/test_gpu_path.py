"""The GPU path's pieces, checked on CPU: vectorised step preparation, the block-table array,
the decode graphs' bookkeeping (captured with an eager stand-in for torch.cuda graphs), that
nothing CUDA-only is imported on a machine without CUDA, and through the overlapped executor
and the graphs: requests parked with a step in flight, engines sharing one model's weights,
and long prompts cut beside short ones (long_prefill_threshold)."""

import functools
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams
from pipeline_dsl.engine.batch import StepBatch, bucket_of
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from pipeline_dsl.engine.tokenizer import IdTokenizer

BS = 4


@pytest.fixture(scope="module")
def model(soft_gguf):
    """The tiny model with spread distributions: a token or context read from the wrong place
    changes the tokens and logprobs after it (the default tiny model's argmax is one token with
    logprob 0.0 whatever it reads: a graph replaying the wrong input would go unnoticed)."""
    t = load_gguf(soft_gguf)
    return LlamaModel(t.config, t.weights, "fp32")


class EagerGraphs:
    """Stands in for torch.cuda graphs: 'replay' recomputes the captured function from the same
    static tensors into the same output tensor, as a graph replay does."""

    def __init__(self):
        self.captured = 0

    def capture(self, fn):
        out = fn()
        self.captured += 1
        return (lambda: out.copy_(fn())), out


class RecordedGraphs(EagerGraphs):
    """Stands in for torch.cuda graphs as strictly as a CPU can: the capture records the ATen ops
    the function ran and the very tensors each read; a replay runs those ops again, alone, over
    those tensors, each result written into the tensor the capture made. As with a real graph, a
    tensor put in place of a static one after capture (assigned, not copied into), a table rebuilt
    after it, a Python value or branch taken at capture: the replay still reads what was captured.
    A host sync inside the capture (.item(), bool(), nonzero) is refused, as a stream capture
    refuses it. (torch.compile'd calls are higher-order ops it does not record: EagerGraphs.)"""

    SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")

    def capture(self, fn):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        syncs = self.SYNCS

        class Record(TorchDispatchMode):
            ops: list = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in syncs:
                    raise RuntimeError(f"operation not permitted when stream is capturing ({func._schema.name})")
                out = func(*args, **(kwargs or {}))
                self.ops.append((func, args, kwargs or {}, out))
                return out

        fn()                                      # the factory's warm-up run
        mode = Record()
        mode.ops = []
        with mode:
            out = fn()
        self.captured += 1

        @torch.inference_mode()           # writes into the capture's tensors, made in inference mode
        def replay():
            for func, args, kwargs, made in mode.ops:
                got = func(*args, **kwargs)
                for old, new in zip(tree_flatten(made)[0], tree_flatten(got)[0]):
                    if isinstance(old, torch.Tensor) and old.data_ptr() != new.data_ptr():
                        old.copy_(new)            # into the captured tensor; views and in-place ops: itself
        return replay, out


def test_the_recorded_stand_in_replays_what_was_captured_and_refuses_a_host_sync():
    box = {"x": torch.ones(3)}
    replay, out = RecordedGraphs().capture(lambda: box["x"] * 2)
    box["x"].fill_(3)                             # copied into: the graph sees it
    replay()
    assert out.tolist() == [6, 6, 6]
    box["x"] = torch.full((3,), 5.0)              # put in its place: a graph still reads the old one
    replay()
    assert out.tolist() == [6, 6, 6]
    with pytest.raises(RuntimeError, match="capturing"):
        RecordedGraphs().capture(lambda: box["x"] * int(box["x"].sum()))


def run_engine(runner, seed, executor=False):
    # itl_target_s=0: no prefill cut by measured step time (none on CUDA), so the schedule, and
    # with it the preemptions and prefix hits the callers count on, is the same on a busy machine
    cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=24, prefill_chunk=8, batch_timeout_s=0.0,
                       itl_target_s=0.0)
    engine = Engine(cfg, runner=runner, tokenizer=IdTokenizer())
    rng = random.Random(seed)
    common = [rng.randrange(3, 250) for _ in range(12)]
    requests = [(str(i), dict(prompt_token_ids=(common if i % 2 else []) + [rng.randrange(3, 250) for _ in
                                                                             range(rng.randint(1, 20))],
                              params=SamplingParams(max_tokens=rng.randint(4, 24), ignore_eos=True, logprobs=0)))
                for i in range(12)]
    got = {}

    def collect(outputs):
        for o in outputs:       # (token, its logprob): a wrong context moves the logprob
            got.setdefault(o.request_id, []).extend((e["token_id"], e["logprob"]) for e in o.logprobs)

    drive(engine, requests, executor, collect)
    return got, engine.stats()


def drive(engine, requests, executor: bool, collect) -> None:
    """Each of `requests` [(id, add_request's keywords)] run to its end on `engine`, its outputs
    given to `collect`: through the executor (the plan's streams, overlapped, replaying graphs as
    on CUDA) or engine.step()."""
    if executor:
        from pipeline_dsl.engine.executor import Executor
        ex = Executor(engine, overlap=True, cuda_graphs=True)
        for rid, kw in requests:
            ex.submit(rid, **kw)
        ex.run(on_output=collect)
    else:
        for rid, kw in requests:
            engine.add_request(rid, **kw)
        while engine.has_unfinished():
            collect(engine.step())


def same_answers(out, ref, tol=1e-4) -> bool:
    """The same tokens for every request, each logprob within tol: another path's float order
    moves a logprob by ~1e-6; a wrong context or position moves it by far more."""
    return (out.keys() == ref.keys()
            and all([t for t, _ in out[k]] == [t for t, _ in ref[k]] for k in ref)
            and all(abs(a - b) <= tol for k in ref for (_, a), (_, b) in zip(out[k], ref[k])))


def eager(model, num_blocks=40):
    r = ModelRunner(model, num_blocks=num_blocks, block_size=BS, pad_decode=True)
    r.native = None                 # the torch path a GPU runs
    return r


@pytest.fixture(scope="module")
def eager_answers(model):
    """run_engine's answers on the eager path of `model` for (seed, executor), each made once for
    the module: the tests that compare with one only read it."""
    return functools.cache(lambda seed, executor: run_engine(eager(model), seed, executor)[0])


@pytest.mark.parametrize("executor", [False, True], ids=["engine.step", "executor"])
def test_decode_graphs_replayed_from_static_buffers_give_the_eager_tokens(model, eager_answers, executor):
    ref = eager_answers(0, executor)
    runner = eager(model)
    factory = RecordedGraphs()
    got = runner.capture_graphs(max_batch=8, max_len=96, graph_factory=factory)
    assert got["graphs"] == factory.captured > 0
    out, stats = run_engine(runner, 0, executor)
    assert same_answers(out, ref) and len(out) == 12
    assert runner.graphs.replays > 0 and stats["preemptions"] > 0
    assert runner.k_cache[:, :].isfinite().all()


def test_a_capture_that_fails_at_load_leaves_every_step_eager_and_says_why(model, eager_answers, caplog):
    # a capture CUDA refuses (an operation a stream capture does not allow) must cost the graphs,
    # not the load: the first device run would otherwise have no figure at all
    ref = eager_answers(0, True)

    class Refused(EagerGraphs):
        def capture(self, fn):
            if self.captured == 3:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().capture(fn)

    runner = eager(model)
    with caplog.at_level("WARNING", logger="agp.model"):
        got = runner.capture_graphs(max_batch=8, max_len=96, graph_factory=Refused(), max_tokens=24)
    assert got["graphs"] == got["piece_graphs"] == 0 and runner.graphs is None
    assert got["fallback"] == runner.graphs_fallback == \
        "RuntimeError: operation not permitted when stream is capturing"
    assert "capture failed" in caplog.text
    out, _ = run_engine(runner, 0, True)
    assert same_answers(out, ref) and len(out) == 12


# flex through the executor only: its steps replay the same piecewise graphs engine.step's do (the
# sdpa rows check that path stepped directly), and test_flex_attention steps flex directly too
@pytest.mark.parametrize("executor,attention", [(False, "sdpa"), (True, "sdpa"), (True, "flex")],
                         ids=["engine.step-sdpa", "executor-sdpa", "executor-flex"])
def test_mixed_steps_replay_piecewise_graphs_and_give_the_eager_tokens(model, eager_answers, attention, executor):
    ref = eager_answers(1, executor)
    runner = ModelRunner(model, num_blocks=40, block_size=BS, pad_decode=True, attention=attention)
    runner.native = None
    factory = RecordedGraphs()
    got = runner.capture_graphs(max_batch=8, max_len=96, graph_factory=factory, max_tokens=24)
    layers = len(model.layers)
    assert got["piece_graphs"] == (layers + 1) * 2 and factory.captured == got["graphs"] + got["piece_graphs"]
    out, stats = run_engine(runner, 1, executor)
    assert same_answers(out, ref) and len(out) == 12
    assert runner.graphs.pieces.replays > 0 and runner.graphs.replays > 0 and stats["preemptions"] > 0


# what sets a family's layers apart: (write_tiny_gguf's arguments, what the loaded config says of it)
FAMILIES = {
    "qwen3": (dict(arch="qwen3", head_dim=32), lambda c: c.qk_norm),       # per-head q/k norms
    "phi3": (dict(arch="phi3", head_dim=32, rope_dims=24,                   # partial rotary, longrope
                  longrope=([1.0] * 12, [1.0 + i for i in range(12)], 256, 1.2)),
             lambda c: dict(c.rope_scaling)["long"]),
    "yarn": (dict(rope_scaling=("yarn", 4.0), rope_metadata={"original_context_length": 16}),   # past 16 tokens
             lambda c: dict(c.rope_scaling)["rope_type"] == "yarn"),
    # dynamic NTK (a config.json's alone): every position past 16 with a base of its own
    "dynamic": (dict(scaling=(("rope_type", "dynamic"), ("factor", 2.0), ("original_max_position_embeddings", 16.0))),
                lambda c: dict(c.rope_scaling)["rope_type"] == "dynamic"),
}


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_models_own_layers_replay_in_every_graph(tmp_path, family, attention):
    """Qwen3's norms over each head of q and k are part of the layers the decode and piecewise
    graphs capture (and of flex attention's steps); Phi-3's partial rotary (24 of 32 dims) and
    longrope (long factors, attention factor), yarn's ramp and attention factor and dynamic NTK's
    base of each position are in the cos/sin tables they read: the tokens and logprobs of the
    eager path."""
    from tiny_model import write_tiny_gguf

    from dataclasses import replace

    fields, has_it = FAMILIES[family]
    fields = dict(fields)
    scaling = fields.pop("scaling", None)
    t = load_gguf(write_tiny_gguf(tmp_path / f"{family}.gguf", embed_scale=0.2, **fields))   # spread distributions
    m = LlamaModel(t.config if scaling is None else replace(t.config, rope_scaling=scaling), t.weights, "fp32")
    assert has_it(m.config)
    ref, _ = run_engine(eager(m), 2)
    runner = ModelRunner(m, num_blocks=40, block_size=BS, pad_decode=True, attention=attention)
    runner.native = None
    got = runner.capture_graphs(max_batch=8, max_len=96, graph_factory=RecordedGraphs(), max_tokens=24)
    assert got["graphs"] > 0 and got["piece_graphs"] > 0
    out, _ = run_engine(runner, 2, True)
    assert same_answers(out, ref) and len(out) == 12
    assert runner.graphs.pieces.replays > 0 and runner.graphs.replays > 0


def test_prompt_outputs_through_piecewise_graphs_equal_eager_ones(model):
    def answer(runner):
        cfg = EngineConfig(max_batch_size=4, max_tokens_per_step=16, prefill_chunk=8, batch_timeout_s=0.0)
        engine = Engine(cfg, runner=runner, tokenizer=IdTokenizer())
        engine.add_request("a", prompt_token_ids=list(range(5, 40)), params=SamplingParams(
            max_tokens=3, ignore_eos=True, prompt_logprobs=2))
        engine.add_request("b", prompt_token_ids=list(range(50, 60)), params=SamplingParams(max_tokens=9, ignore_eos=True))
        outs = [o for _ in range(100) if engine.has_unfinished() for o in engine.step()]
        first = next(o for o in outs if o.request_id == "a")
        return first.prompt_logprobs, [t for o in outs for t in o.new_token_ids]

    runner = eager(model)
    runner.capture_graphs(max_batch=4, max_len=64, graph_factory=RecordedGraphs(), max_tokens=16)
    got, want = answer(runner), answer(eager(model))
    assert runner.graphs.pieces.replays > 0
    assert got[1] == want[1] and len(got[0]) == len(want[0]) == 35
    for g, w in zip(got[0][1:], want[0][1:]):
        assert g["token_id"] == w["token_id"] and abs(g["logprob"] - w["logprob"]) < 1e-4
        assert [t for t, _ in g["top"]] == [t for t, _ in w["top"]]


def test_token_buckets_pad_a_step_by_less_than_16_rows_or_half_its_rows():
    from pipeline_dsl.engine.cuda_pieces import token_buckets
    b = token_buckets(700)
    assert b[:5] == [16, 32, 48, 64, 96] and b[-1] >= 700 and b == sorted(set(b))
    pad = {n: next(x for x in b if x >= n) for n in range(1, 701)}
    assert all(pad[n] - n < 16 for n in range(1, 65)) and all(pad[n] < 1.5 * n for n in range(65, 701))


def test_capture_touches_no_kv_slot_but_the_scratch_one(model):
    runner = eager(model)
    runner.k_cache.fill_(3.0)
    runner.v_cache.fill_(3.0)
    runner.capture_graphs(max_batch=4, max_len=40, graph_factory=RecordedGraphs())
    assert bool((runner.k_cache == 3.0).all()) and bool((runner.v_cache == 3.0).all())


def test_graph_buckets_cover_every_padded_decode_batch_the_scheduler_makes():
    from pipeline_dsl.engine.cuda_graphs import batch_buckets, context_buckets
    from pipeline_dsl.engine.scheduler import bucket
    for cap in (1, 8, 24, 256):
        assert {bucket(n, cap) for n in range(1, cap + 1)} <= set(batch_buckets(cap))
    blocks = context_buckets(600)
    assert blocks[-1] >= 600 and {bucket_of(n, (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)) for n in range(1, 601)} <= set(blocks)


def random_items(rng, vocab, n=12):
    items, nxt = [], 0
    for _ in range(n):
        start = rng.randrange(0, 30)
        count = 1 if rng.random() < 0.6 else rng.randint(2, 9)
        blocks = -(-(start + count) // BS) + rng.randrange(0, 2)      # sometimes a block to spare
        table = list(range(nxt, nxt + blocks))
        rng.shuffle(table)
        nxt += blocks
        items.append(SeqBatchItem([rng.randrange(3, vocab) for _ in range(count)], start, table, rng.random() < 0.8))
    return items


def test_vectorised_preparation_gives_slots_positions_and_rows_of_every_item(model):
    runner = ModelRunner(model, num_blocks=256, block_size=BS)
    rng = random.Random(1)
    for _ in range(5):
        items = random_items(rng, model.config.vocab_size)
        step = runner.prepare(StepBatch.from_items(items))
        pos, slots, rows, row = [], [], [], 0
        for it in items:
            for p in range(it.start_pos, it.start_pos + len(it.token_ids)):
                pos.append(p)
                slots.append(it.block_table[p // BS] * BS + p % BS)
            row += len(it.token_ids)
            if it.sample:
                rows.append(row - 1)
        assert step.positions.tolist() == pos and step.slots.tolist() == slots
        assert step.sample_rows.tolist() == rows
        assert step.tokens.tolist() == [t for it in items for t in it.token_ids]


def test_a_short_block_table_is_refused_with_what_and_where(model):
    runner = ModelRunner(model, num_blocks=16, block_size=BS)
    with pytest.raises(ValueError, match="block table of 1 blocks cannot hold 6 tokens"):
        runner.prepare(StepBatch.from_items([SeqBatchItem([5, 6], 4, [0], True)]))


def test_block_table_array_follows_allocation_sharing_and_frees():
    bm = BlockManager(num_blocks=64, block_size=BS)
    rng = random.Random(3)
    live = {}
    for i in range(300):
        if live and rng.random() < 0.3:
            sid = rng.choice(sorted(live))
            bm.free_seq(sid)
            del live[sid]
        elif live and rng.random() < 0.5:
            sid = rng.choice(sorted(live))
            live[sid] += rng.randint(1, 9)
            if not bm.allocate(sid, live[sid]):
                live[sid] -= 1
                bm.free_seq(sid)
                del live[sid]
        else:
            sid = f"s{i}"
            toks = [rng.randrange(5) for _ in range(rng.randint(1, 20))]
            bm.match_prefix(sid, toks)
            if bm.allocate(sid, len(toks)):
                bm.commit(sid, toks, len(toks))
                live[sid] = len(toks)
            else:
                bm.free_seq(sid)
        bm.check_invariants()
        if live:
            rows = np.array([bm.row(s) for s in sorted(live)])
            tables, lens = bm.tables.rows(rows)
            for s, t, n in zip(sorted(live), tables, lens):
                assert t[:n].tolist() == bm.table(s)


def test_a_machine_without_cuda_never_imports_cuda_only_code_nor_the_compiler(tiny_gguf):
    # with either attention: torch's eager flex_attention goes through torch.compile(backend=
    # "eager"), dynamo's import (~1.5 s of CPU) in every process; the CPU flex backend needs none
    code = ("import os, sys, torch\n"
            "from pipeline_dsl.engine import Engine, EngineConfig, SamplingParams\n"
            "from pipeline_dsl.engine.executor import run_requests\n"
            "for attention in ('sdpa', 'flex'):\n"
            f"    e = Engine(EngineConfig(model={str(tiny_gguf)!r}, dtype='fp32', kv_budget_bytes=1 << 20))\n"
            "    run_requests(e, [('a', dict(prompt='hello', params=SamplingParams(max_tokens=3)))])\n"
            "    assert e.stats()['attention'] == attention and (attention == 'sdpa' or e.runner.flex.calls > 0)\n"
            "    os.environ['AGP_ATTENTION'] = 'flex'                 # the second engine: flex\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pipeline_dsl.engine.cuda', 'torch._dynamo'))))\n")
    env = {k: v for k, v in os.environ.items() if k != "AGP_ATTENTION"}   # the first engine: the default
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bucket_of_rounds_up_past_the_last_bucket():
    assert [bucket_of(n) for n in (1, 3, 17, 256, 257)] == [1, 4, 24, 256, 384]
    assert torch.tensor(0).device.type == "cpu"


def test_graphs_are_captured_largest_first_so_smaller_ones_reuse_the_pool(model):
    # the graphs share one memory pool; a capture reuses only what earlier ones freed, so the
    # largest step goes first (as vLLM does): every later capture's rows are at most the last's
    from pipeline_dsl.engine.cuda_graphs import capture_order

    rows, keys = [], []

    class Recording(EagerGraphs):
        def capture(self, fn):
            replay, out = super().capture(fn)
            rows.append(out.shape[0])                      # [rows, H]: a piece's bucket or a decode batch
            return replay, out

    runner = eager(model)
    hidden = runner.hidden

    def spy(step):
        if not keys or keys[-1] != step.graph_key:
            keys.append(step.graph_key)
        return hidden(step)

    runner.hidden = spy
    got = runner.capture_graphs(max_batch=8, max_len=96, graph_factory=Recording(), max_tokens=24)
    assert len(rows) == got["graphs"] + got["piece_graphs"]
    assert rows == sorted(rows, reverse=True) and rows[0] == 32 and rows[-1] == 1
    assert keys == capture_order(8, 96 // BS, runner.num_blocks) == sorted(keys, reverse=True)
    assert set(keys) == {(B, n) for B in (1, 2, 4, 8) for n in (1, 2, 4, 8, 12, 16, 24) if B * n <= 80}


def test_no_graph_is_captured_for_a_context_longer_than_the_kv_pool_holds():
    # a pool of 40 blocks under a model context of 8,192 tokens (a small KV budget): graphs
    # stop at the bucket that holds the pool's 40 blocks (a context of 8,192 could not exist)
    from pipeline_dsl.engine.cuda_graphs import capture_order

    contexts = {n for _, n in capture_order(8, 8192 // 16, 40)}
    assert max(contexts) == bucket_of(40) and bucket_of(40) >= 40
    assert {n for _, n in capture_order(1, 8192 // 16, 4096)} >= {512}          # a big pool: all of it


def test_warm_up_compiles_every_version_of_the_fused_pieces_a_step_needs(tiny_gguf):
    # performance mode compiles RMSNorm, RoPE and the SwiGLU gate with dynamic shapes; a size of
    # 1 is specialised, so one request's eager decode step (graphs off) would compile in-request
    t = load_gguf(tiny_gguf)
    m = LlamaModel(t.config, t.weights, "fp32")
    m.enable_compile(force=True)
    versions = []

    def counting(gm, example_inputs):
        versions.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        for piece in (m.rope, m.silu_mul, m.rms_fn):
            piece.fn = torch.compile(piece.eager, dynamic=True, backend=counting)
        runner = ModelRunner(m, num_blocks=40, block_size=16, pad_decode=True)
        runner.native = None                                  # the torch path a GPU runs
        runner.warm_up()
        at_load = len(versions)
        with torch.inference_mode():                          # as the engine runs its steps
            for items, pad in (([SeqBatchItem([7], 20, [1, 2], True)], 1),
                               ([SeqBatchItem([7], 20, [1, 2], True), SeqBatchItem([9], 5, [3], True)], 2),
                               ([SeqBatchItem([5] * 40, 0, [4, 5, 6], True)], None)):
                step = runner.prepare(StepBatch.from_items(items, pad_to=pad))
                step.slots.fill_(runner.num_slots)            # K/V to the scratch slot only
                runner.run(step, graphs=False)
        assert at_load > 0 and len(versions) == at_load
    finally:
        torch._dynamo.reset()


# ---- the newest scheduling and loading changes through the executor and the graphs --------------
# On CUDA the executor keeps a step in flight while the host schedules the next one (step k + 1 is
# scheduled before step k's tokens are back), and every step replays a decode graph or the
# piecewise graphs. The CPU executor with overlap runs the host's works in the same order (admit,
# schedule, lookup of step k + 1, then the emit of step k) and RecordedGraphs replays as a graph does,
# so these check on CPU what a device run depends on.

def graphs_runner(model, num_blocks=64, max_batch=8, max_len=96, max_tokens=24):
    """The torch path a GPU runs, its decode and piecewise graphs captured (eager stand-in)."""
    r = eager(model, num_blocks)
    r.capture_graphs(max_batch=max_batch, max_len=max_len, graph_factory=RecordedGraphs(), max_tokens=max_tokens)
    return r


def collector(got, prompt_lp=None):
    def collect(outputs):
        for o in outputs:           # (token, its logprob): a wrong context moves the logprob
            got.setdefault(o.request_id, []).extend((e["token_id"], e["logprob"]) for e in o.logprobs)
            if prompt_lp is not None and o.prompt_logprobs:
                prompt_lp[o.request_id] = o.prompt_logprobs
    return collect


def stepped(engine, requests) -> tuple[dict, dict]:
    """The eager reference: engine.step, nothing in flight, nothing parked."""
    got, prompt_lp = {}, {}
    collect = collector(got, prompt_lp)
    for rid, kw in requests:
        engine.add_request(rid, **kw)
    while engine.has_unfinished():
        collect(engine.step())
    return got, prompt_lp


def test_requests_parked_with_a_step_in_flight_answer_as_never_parked_through_graphs(model):
    # a paused stream parks its sequences (out of the batch, KV blocks freed) at the next admit,
    # while the step scheduled before is still computing: its token comes back after the park
    # and counts, and the blocks it writes may already be another sequence's. Let go, the sequence
    # recomputes, reading the token still in flight from that step's samples. Parked and let go at
    # once, after one more token, and mid-prefill (a prompt whose logprobs are wanted): the tokens,
    # logprobs and prompt logprobs of a run that never parked.
    cfg = dict(max_batch_size=8, max_tokens_per_step=24, prefill_chunk=8, batch_timeout_s=0.0,
               itl_target_s=0.0)             # no prefill cut by measured time (none on CUDA): one schedule
    rng = random.Random(0)
    common = [rng.randrange(3, 250) for _ in range(12)]                  # a prefix in the cache
    requests = [(str(i), dict(prompt_token_ids=common + [rng.randrange(3, 250) for _ in range(rng.randint(1, 10))],
                              params=SamplingParams(max_tokens=rng.randint(8, 20), ignore_eos=True, logprobs=0)))
                for i in range(6)]
    requests.append(("p", dict(prompt_token_ids=[rng.randrange(3, 250) for _ in range(40)],
                               params=SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0, prompt_logprobs=1))))
    ref, ref_lp = stepped(Engine(EngineConfig(**cfg), runner=eager(model, 64), tokenizer=IdTokenizer()), requests)

    from pipeline_dsl.engine.executor import Executor
    engine = Engine(EngineConfig(**cfg), runner=graphs_runner(model), tokenizer=IdTokenizer())
    ex = Executor(engine, overlap=True, cuda_graphs=True)
    got, prompt_lp = {}, {}
    collect = collector(got, prompt_lp)
    parked, late, p_seen = set(), [], []

    def on_output(outputs):          # on the host thread, in the emit of step k - 1 (step k in flight)
        collect(outputs)
        for o in outputs:
            rid, n = o.request_id, len(got[o.request_id])
            if o.finished:
                continue
            if rid in parked:        # the token of the step in flight when it was parked
                late.append(rid)
                parked.discard(rid)
                ex.park(rid, False)
            elif rid != "p" and n in (2, 7):
                ex.park(rid)
                if int(rid) % 2:
                    parked.add(rid)
                else:                # let go in the same admit: recomputed with a token in flight
                    ex.park(rid, False)
            if rid == "0" and n in (1, 3):
                seq = engine.seqs["p"]
                p_seen.append((seq.status, seq.num_computed))
                ex.park("p", n == 1)

    for rid, kw in requests:
        ex.submit(rid, **kw)
    ex.run(on_output=on_output)
    assert same_answers(got, ref) and len(got) == 7
    assert sorted(late) == ["1", "1", "3", "3", "5", "5"]       # each park found its step in flight
    assert p_seen[0][0] == "running" and 0 < p_seen[0][1] < 40      # parked with a prompt chunk in flight
    assert len(prompt_lp["p"]) == len(ref_lp["p"]) == 40
    for g, w in zip(prompt_lp["p"][1:], ref_lp["p"][1:]):
        assert g["token_id"] == w["token_id"] and abs(g["logprob"] - w["logprob"]) < 1e-4
    stats = engine.stats()
    assert stats["preemptions"] == 0 and stats["kv_blocks_used"] == 0 and stats["cached_tokens"] > 0
    assert engine.runner.graphs.replays > 0 and engine.runner.graphs.pieces.replays > 0
    engine.blocks.check_invariants()


def test_engines_sharing_one_models_weights_replay_their_own_graphs_side_by_side(soft_gguf):
    # segments on one model take one loaded copy (LoadedModels), and each engine captures its
    # graphs over it at load: static buffers and the KV pool a graph writes are the engine's own,
    # only the weights are shared. Two engines stepping at once through their executors answer
    # as each does alone on weights loaded apart.
    import threading

    from pipeline_dsl.engine.models import LoadedModels, load_model, resolve_model

    models = LoadedModels()
    source = resolve_model(str(soft_gguf))
    (m1, _, shared1), (m2, _, shared2) = (models.load(source, dtype="fp32") for _ in range(2))
    assert m1 is m2 and (shared1, shared2) == (False, True)
    runners = [graphs_runner(m1, num_blocks=40), graphs_runner(m2, num_blocks=48)]
    apart = load_model(source, dtype="fp32")[0]
    refs = [run_engine(eager(apart, r.num_blocks), seed)[0] for seed, r in enumerate(runners)]

    outs, errors = [None, None], []

    def one(i):
        try:
            outs[i] = run_engine(runners[i], i, executor=True)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (out, stats), ref, r in zip(outs, refs, runners):
        assert same_answers(out, ref) and len(out) == 12
        assert r.graphs.replays > 0 and r.graphs.pieces.replays > 0 and stats["preemptions"] > 0


@pytest.mark.parametrize("batch,budget", [(4, 4), (8, 16)])
def test_long_prompts_cut_beside_short_ones_replay_the_graphs_and_give_the_eager_tokens(model, batch, budget):
    # long_prefill_threshold: a long prompt's piece is cut to half the step's prefill room while a
    # short prompt waits or prefills, and short prompts sent during a long prefill join at once.
    # The steps this makes must replay the graphs correctly: mixed steps of a cut long piece and
    # short pieces (piecewise graphs), and, with a budget of one token per slot, steps of one token
    # per sequence of which one is a prompt's piece that samples nothing (a decode graph).
    cfg = dict(max_batch_size=batch, max_tokens_per_step=budget, prefill_chunk=16, batch_timeout_s=0.0,
               itl_target_s=0.0, long_prefill_threshold=8)
    rng = random.Random(2)

    def req(n, m):
        return dict(prompt_token_ids=[rng.randrange(3, 250) for _ in range(n)],
                    params=SamplingParams(max_tokens=m, ignore_eos=True, logprobs=0))

    first = [("L0", req(50, 5)), ("s0", req(5, 24)), ("L1", req(40, 4))]
    later = [(f"s{i}", req(rng.randint(3, 9), rng.randint(3, 8))) for i in range(1, 6)]
    ref, _ = stepped(Engine(EngineConfig(**cfg), runner=eager(model, 96), tokenizer=IdTokenizer()), first + later)

    from pipeline_dsl.engine.executor import Executor
    runner = graphs_runner(model, num_blocks=96, max_batch=batch, max_len=128, max_tokens=budget)
    engine = Engine(EngineConfig(**cfg), runner=runner, tokenizer=IdTokenizer())
    steps, schedule = [], engine.schedule

    def recording():
        so = schedule()
        steps.append([(it.seq.request_id, len(it.seq.token_ids) - it.start, it.num_tokens, it.sample)
                      for it in so.items])
        return so

    engine.schedule = recording
    ex = Executor(engine, overlap=True, cuda_graphs=True)
    got = {}
    collect = collector(got)

    def on_output(outputs):           # short requests arrive one by one while the long ones prefill
        collect(outputs)
        if "s0" in got and len(got["s0"]) <= len(later) and any(o.request_id == "s0" for o in outputs):
            rid, kw = later[len(got["s0"]) - 1]
            ex.submit(rid, **kw)

    for rid, kw in first:
        ex.submit(rid, **kw)
    ex.run(on_output=on_output)
    assert same_answers(got, ref) and len(got) == 8

    def long_cut(step) -> bool:
        """A long prompt's piece smaller than the budget and chunk left it, beside a short prefill."""
        before = 0
        for rid, left, n, _ in step:
            if rid[0] == "L" and left > 8 and n < min(left, budget - before, 16):
                return any(r[0] == "s" and lft > 1 for r, lft, _, _ in step)
            before += n
        return False

    assert any(long_cut(s) for s in steps)
    if budget == batch:
        assert any(all(n == 1 for _, _, n, _ in s) and not all(smp for *_, smp in s) for s in steps if s)
    assert runner.graphs.replays > 0 and runner.graphs.pieces.replays > 0


@pytest.mark.parametrize("executor,attention", [(False, "sdpa"), (True, "flex")], ids=["engine.step-sdpa", "executor-flex"])
def test_speculative_steps_through_the_graphs_give_the_tokens_without_speculation(model, executor, attention):
    # a verifying step feeds a sequence's last token and its drafts as a short chunk and wants every
    # row's logits: on CUDA it replays the piecewise graphs beside the decode graphs of plain steps.
    # Greedy: the tokens of the eager path without speculation, drafts accepted on the way
    import itertools

    from pipeline_dsl.engine.scheduler import TIMING_WINDOW

    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 6 + [12], [13, 14] * 8, [20, 21, 22, 23, 24]]

    def answers(runner, speculate):
        cfg = dict(max_batch_size=8, max_tokens_per_step=24, prefill_chunk=8, batch_timeout_s=0.0, itl_target_s=0.0)
        if speculate:
            cfg.update(speculate="ngram", prompt_lookup_min=1)
        # every forward timed one second and plain steps 100: the measured rule never pauses drafting
        engine = Engine(EngineConfig(**cfg), runner=runner, tokenizer=IdTokenizer(),
                        step_timer=functools.partial(next, itertools.count(0.0, 1.0)))
        for _ in range(TIMING_WINDOW):
            engine.scheduler.observe(0, 100.0)
        got = {}

        def collect(outputs):
            for o in outputs:
                got.setdefault(o.request_id, []).extend(o.new_token_ids)

        requests = [(str(i), dict(prompt_token_ids=p, params=SamplingParams(max_tokens=16, ignore_eos=True)))
                    for i, p in enumerate(prompts)]
        drive(engine, requests, executor, collect)
        return got, engine.stats()

    ref, _ = answers(eager(model), False)
    runner = ModelRunner(model, num_blocks=40, block_size=BS, pad_decode=True, attention=attention)
    runner.native = None
    runner.capture_graphs(max_batch=8, max_len=96, graph_factory=RecordedGraphs(), max_tokens=24)
    out, stats = answers(runner, True)
    assert out == ref and all(len(t) == 16 for t in out.values())
    assert stats["spec_accepted_tokens"] > 0
    assert runner.graphs.replays > 0 and runner.graphs.pieces.replays > 0
