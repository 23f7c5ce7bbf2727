"""The flex attention backend (engine/flex.py), checked on CPU with its eager computation.

On CUDA this backend is chosen by default and compiled to Triton; here the same mask, block
lists and calls run eagerly: torch's eager flex_attention's computation, written out so that a
CPU process imports no compiler (checked against torch's own call here; that no compiler is
imported: test_gpu_path). Checked: the host-built
block lists and the mask against a per-row reference; a runner with the backend forced against the gather + SDPA path on random
steps (decodes of every length, prefill chunks with and without a cached prefix, mixed steps,
shared prefix blocks, tables of shuffled blocks; GQA and not; fp32 and bf16); whole engine
runs with preemption, chunked prefill and prefix hits, stepped directly, through the plan's
executor and through decode graphs; and the fallback when a block sits at two logical indices.
"""

import random
import warnings

import numpy as np
import pytest
import torch

from pipeline_dsl.engine.batch import StepBatch
from pipeline_dsl.engine.flex import DECODE_KERNEL_ROWS, Q_BLOCK, _paged_mask, host_meta
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem
from test_gpu_path import EagerGraphs, run_engine, same_answers
from tiny_model import write_tiny_gguf

BS = 4


@pytest.fixture(scope="module")
def weights(tiny_gguf):
    return load_gguf(tiny_gguf)


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    return load_gguf(write_tiny_gguf(tmp_path_factory.mktemp("mha") / "mha.gguf", kv_heads=4))


def runners(t, dtype, num_blocks=48, pad=False):
    model = LlamaModel(t.config, t.weights, dtype)
    ref = ModelRunner(model, num_blocks=num_blocks, block_size=BS, pad_decode=pad)
    ref.native = None                                     # gather + SDPA: the reference
    flex = ModelRunner(model, num_blocks=num_blocks, block_size=BS, pad_decode=pad, attention="flex")
    assert flex.attention == "flex" and flex.native is None and ref.attention == "sdpa"
    return flex, ref


def random_step(rng, vocab, num_blocks, n=None):
    """Items of one step over shuffled blocks: decodes at any position, prefill chunks with and
    without a cached prefix; some share their first blocks (a prefix hit: same logical index),
    never a block a step writes to."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    items = []
    for _ in range(n or rng.randint(1, 7)):
        kind = rng.random()
        start = 0 if kind < 0.25 else rng.randrange(1, 28)
        count = 1 if kind > 0.6 else rng.randint(1, 11)
        blocks = -(-(start + count) // BS)
        shared = []
        donors = [it for it in items if it.start_pos // BS and start // BS]
        if donors and rng.random() < 0.5:
            d = rng.choice(donors)
            shared = d.block_table[:rng.randint(1, min(d.start_pos, start) // BS)]
        if len(free) < blocks - len(shared):
            break
        table = shared + [free.pop() for _ in range(blocks - len(shared))]
        items.append(SeqBatchItem([rng.randrange(3, vocab) for _ in range(count)], start, table, True))
    return items


def fill_pools(*rs, seed=0):
    """The same random K/V in every runner's pool (bf16-representable, so an fp32 pool holds
    exactly what a bf16 one does)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rs[0].k_cache.shape, generator=g).bfloat16().float()
    v = torch.randn(rs[0].v_cache.shape, generator=g).bfloat16().float()
    for r in rs:
        r.k_cache.copy_(k)
        r.v_cache.copy_(v)


def reference_keys(items, row_item, row_pos):
    """Per row: the pool slots it must attend (its context up to its own position)."""
    out = []
    for i, p in zip(row_item, row_pos):
        t = items[i].block_table
        out.append({t[j // BS] * BS + j % BS for j in range(p + 1)})
    return out


@pytest.mark.parametrize("seed", range(6))
def test_block_lists_and_mask_keep_exactly_each_rows_context(seed):
    rng = random.Random(seed)
    nb = 40
    items = random_step(rng, 100, nb, n=rng.randint(2, 9))
    n = len(items)
    W = max(len(it.block_table) for it in items)
    tables = np.zeros((n, W), np.int64)
    for i, it in enumerate(items):
        tables[i, :len(it.block_table)] = it.block_table
    ctx = np.array([-(-(it.start_pos + len(it.token_ids)) // BS) for it in items])
    row_item = np.concatenate([[i] * len(it.token_ids) for i, it in enumerate(items)])
    row_pos = np.concatenate([np.arange(it.start_pos, it.start_pos + len(it.token_ids)) for it in items])
    m = host_meta(tables, ctx, row_item, row_pos, nb)
    T, Tp = len(row_item), len(m["item"])
    assert Tp % Q_BLOCK == 0 and Tp >= T and (m["qpos"][T:] == -1).all()
    want = reference_keys(items, row_item, row_pos)
    for q in range(m["kv_num"].shape[0]):
        listed = m["kv_idx"][q, :m["kv_num"][q]].tolist()
        assert len(listed) == len(set(listed))                          # each block once
        rows = range(q * Q_BLOCK, min(q * Q_BLOCK + Q_BLOCK, T))
        need = {s // BS for r in rows for s in want[r]}
        assert need <= set(listed)                                      # every key a row needs is loaded
        for i in sorted({row_item[r] for r in rows}):                   # an item's blocks in logical order
            own = [b for b in listed if b in items[i].block_table[:ctx[i]]]
            assert own == [b for b in items[i].block_table[:ctx[i]] if b in set(listed)]
    mask = _paged_mask(*(torch.from_numpy(m[k]) for k in ("item", "qpos", "logical", "tables")), BS)
    qi = torch.arange(Tp)[:, None].expand(Tp, nb * BS)
    kv = torch.arange(nb * BS)[None, :].expand(Tp, nb * BS)
    got = mask(0, 0, qi, kv)                                            # [Tp, slots]
    for r in range(T):
        assert set(torch.nonzero(got[r]).flatten().tolist()) == want[r]
    assert not got[T:].any()


def test_a_block_at_two_logical_indices_is_refused_and_the_step_reads_by_gathering(weights):
    tables = np.array([[3, 5], [5, 3]])
    assert host_meta(tables, np.array([2, 2]), np.array([0, 1]), np.array([6, 6]), 8) is None
    flex, ref = runners(weights, "fp32")
    fill_pools(flex, ref)
    items = [SeqBatchItem([7], 6, [3, 5], True), SeqBatchItem([9], 6, [5, 3], True)]
    step = flex.prepare(StepBatch.from_items(items))
    assert step.flex is None
    torch.testing.assert_close(flex.run(step), ref.execute(items))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("heads", ["gqa", "mha"])
def test_flex_runner_gives_the_gather_paths_logits_on_random_steps(weights, mha, dtype, heads):
    """fp32: the same logits to rounding. bf16: as close to the fp32 computation as the gather
    path in bf16 is (two bf16 computations that sum in different orders differ by more than
    their rounding, so each is held to the fp32 truth, not to the other)."""
    t = weights if heads == "gqa" else mha
    flex, ref = runners(t, dtype)
    truth = runners(t, "fp32")[1] if dtype == "bf16" else ref
    fill_pools(flex, ref, truth, seed=1)
    rng = random.Random(7)
    kinds = set()
    for _ in range(12):
        items = random_step(rng, flex.model.config.vocab_size, flex.num_blocks)
        kinds |= {"decode" if len(it.token_ids) == 1 else "cold" if it.start_pos == 0 else "cached"
                  for it in items}
        got, want = flex.execute(items), ref.execute(items)             # [n, V] each
        if dtype == "fp32":
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        else:
            exact = truth.execute(items)
            assert (got - exact).abs().max() <= 1.5 * (want - exact).abs().max() + 0.02
    assert kinds == {"decode", "cold", "cached"} and flex.flex.calls > 0


def test_padded_decode_steps_use_the_graph_buckets_sizes(weights):
    flex, ref = runners(weights, "fp32", pad=True)
    fill_pools(flex, ref, seed=2)
    items = [SeqBatchItem([5], 9, [7, 2, 30], True), SeqBatchItem([6], 2, [11], True),
             SeqBatchItem([8], 13, [1, 4, 9, 40], True)]
    step = flex.prepare(StepBatch.from_items(items, pad_to=4))
    B, nblk = step.graph_key
    assert B == 4 and step.flex.tables.shape == (4, nblk) and step.flex.item.shape[0] == 2 * Q_BLOCK
    torch.testing.assert_close(flex.run(step), ref.execute(items, pad_to=4))


def test_warm_up_runs_flex_on_both_sides_of_the_compiled_kernels_row_guard(weights):
    # on CUDA the compiled kernel is guarded on its query rows being below DECODE_KERNEL_ROWS:
    # warm-up (at load) must see both sides, or a long prompt compiles inside its request
    flex, _ = runners(weights, "fp32")
    rows, attention = [], flex.flex.attention

    def spy(meta, q, kc, vc):
        rows.append(meta.item.shape[0])                   # Tp: the padded query rows the kernel sees
        return attention(meta, q, kc, vc)

    flex.flex.attention = spy
    flex.warm_up()
    assert min(rows) < DECODE_KERNEL_ROWS <= max(rows)
    assert flex.attention == "flex" and flex.attention_fallback is None


@pytest.mark.parametrize("mode", ["engine.step", "executor", "graphs"])
def test_engine_with_flex_attention_gives_the_default_paths_tokens(weights, mode):
    model = LlamaModel(weights.config, weights.weights, "fp32")

    def runner(attention):
        r = ModelRunner(model, num_blocks=40, block_size=BS, pad_decode=True, attention=attention)
        r.native = None
        return r

    seed = {"engine.step": 3, "executor": 4, "graphs": 7}[mode]   # each mix preempts (40 blocks), reuses a prefix
    ref, _ = run_engine(runner("sdpa"), seed, executor=mode != "engine.step")
    r = runner("flex")
    if mode == "graphs":
        r.capture_graphs(max_batch=8, max_len=96, graph_factory=EagerGraphs())
    out, stats = run_engine(r, seed, executor=mode != "engine.step")
    assert same_answers(out, ref) and len(out) == 12
    assert stats["preemptions"] > 0 and stats["cached_tokens"] > 0 and r.flex.calls > 0
    if mode == "graphs":
        assert r.graphs.replays > 0


def test_agp_attention_picks_the_backend_and_a_bad_value_is_an_input_error(tiny_gguf, monkeypatch):
    from pipeline_dsl.engine import InputError, SamplingParams
    from tiny_model import tiny_engine

    def answer(eng):
        eng.add_request("a", prompt="hello world", params=SamplingParams(max_tokens=6, ignore_eos=True))
        return [t for _ in range(50) if eng.has_unfinished() for o in eng.step() for t in o.new_token_ids]

    # no batch window: a step admits the request at once (with the default 1 ms window, 50 quick
    # steps could all fall inside it and the answer came back empty)
    default = tiny_engine(tiny_gguf, batch_timeout_s=0.0)
    assert default.stats()["attention"] == "sdpa"                       # CPU: gather + native kernels
    monkeypatch.setenv("AGP_ATTENTION", "flex")
    flex = tiny_engine(tiny_gguf, batch_timeout_s=0.0)
    assert flex.stats()["attention"] == "flex" and flex.runner.native is None
    got, want = answer(flex), answer(default)
    assert len(want) == 6 and got == want
    monkeypatch.setenv("AGP_ATTENTION", "paged")
    with pytest.raises(InputError, match="AGP_ATTENTION=paged"):
        tiny_engine(tiny_gguf)


@pytest.mark.parametrize("dtype,heads", [("fp32", "mha"), ("bf16", "gqa")])
def test_the_cpu_backend_computes_what_torchs_flex_attention_does(weights, mha, dtype, heads):
    # the CPU backend writes out torch's eager computation (FlexPaged._eager); torch's own call,
    # given the BlockMask a device compiles with, gives the same rows, padding rows 0 included
    from torch.nn.attention.flex_attention import flex_attention

    t = mha if heads == "mha" else weights
    flex, _ = runners(t, dtype)
    c, f = flex.model.config, flex.flex
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    tdt = flex.model.dtype
    for _ in range(4):
        step = flex.prepare(StepBatch.from_items(random_step(rng, c.vocab_size, flex.num_blocks)))
        T, Tp = step.flex.rows, step.flex.item.shape[0]
        q = torch.randn(Tp, c.num_heads, c.head_dim, generator=g).to(tdt)
        kc, vc = (torch.randn(f.slots + 1, c.num_kv_heads, c.head_dim, generator=g).to(tdt) for _ in "kv")
        k, v = (x[:f.slots].transpose(0, 1).unsqueeze(0) for x in (kc, vc))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                 # eager flex_attention says it is not compiled
            want = flex_attention(q.transpose(0, 1).unsqueeze(0), k, v, block_mask=f.block_mask(step.flex),
                                  enable_gqa=c.num_heads != c.num_kv_heads)[0].transpose(0, 1)   # [Tp, nh, hd]
        assert not want[T:].any()                           # padding rows: 0
        torch.testing.assert_close(f.attention(step.flex, q, kc, vc), want.reshape(Tp, -1), rtol=0, atol=0)


def counting_backend(versions):
    """A torch.compile backend that records each compiled version's q, k, v shapes and asks what
    inductor's flex lowering asks of every version on CUDA: whether the query has fewer than
    DECODE_KERNEL_ROWS rows (a guard, so each side needs a version of its own)."""
    def backend(gm, example_inputs):
        qkv = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("example_value"), torch.Tensor)
               and n.meta["example_value"].dim() == 4 and n.meta["example_value"].is_floating_point()][:3]
        bool(qkv[0].size(2) < DECODE_KERNEL_ROWS)
        versions.append([tuple(t.shape) for t in qkv])
        return gm.forward
    return backend


@pytest.fixture
def fresh_dynamo(monkeypatch):
    from pipeline_dsl.engine import flex as flex_module
    torch._dynamo.reset()
    monkeypatch.setattr(flex_module, "_shapes", set())
    with torch._dynamo.config.patch(recompile_limit=8):                  # torch's default, restored after
        yield
    torch._dynamo.reset()


def test_every_compiled_flex_version_is_made_at_warm_up_and_four_models_stay_under_the_limit(
        weights, mha, fresh_dynamo):
    # every runner of a process shares flex_attention's compiled versions, and with
    # fullgraph=True the recompile limit raises: four runner shapes need 3 + 3 x 2 = 9 > 8.
    # The versions they make also serve the check after them, engines sharing one model's weights
    # (which would otherwise compile the first runner's in a fresh dynamo of its own)
    from pipeline_dsl.engine.flex import FlexPaged, VERSIONS_PER_RUNNER

    versions, runners, backends = [], [], []
    for t, nb in ((weights, 48), (mha, 48), (weights, 40), (mha, 40)):
        r = ModelRunner(LlamaModel(t.config, t.weights, "fp32"), num_blocks=nb, block_size=BS,
                        pad_decode=True, attention="flex")
        backends.append(counting_backend(versions))
        r.flex = FlexPaged(r, backend=backends[-1])
        before = len(versions)
        r.warm_up()
        assert r.attention == "flex" and r.attention_fallback is None
        assert 2 <= len(versions) - before <= VERSIONS_PER_RUNNER
        r.capture_graphs(max_batch=4, max_len=48, graph_factory=EagerGraphs(), max_tokens=16)
        runners.append(r)
    at_load = len(versions)
    assert at_load < torch._dynamo.config.recompile_limit
    rng = random.Random(5)
    with torch.inference_mode():                          # as the engine runs its steps
        for i in range(24):
            r = runners[i % 4]
            if i % 3 == 0:                                # a long prompt: past the row guard
                items = [SeqBatchItem([3] * rng.randint(120, 150), 0, list(range(38)), True)]
            else:
                items = random_step(rng, 100, r.num_blocks)
            decode = all(len(it.token_ids) == 1 for it in items)
            step = r.prepare(StepBatch.from_items(items, pad_to=8 if decode and i % 2 else None))
            step.slots.fill_(r.num_slots)                 # K/V to the scratch slot only
            r.run(step, graphs=False)
    assert len(versions) == at_load, "a step compiled"
    for q, k, v in versions:                              # the model's sizes static, never symbolic
        assert all(isinstance(d, int) for d in (q[0], q[1], q[3], *k, *v))

    # engines sharing one model's weights share its compiled flex versions: segments on one model
    # take one loaded copy of it (models.LoadedModels) and a runner each, with its own KV pool of
    # the same size: the limit is raised per runner shape, not per runner, so a second and third
    # runner of the first runner's shape, on its very model, must find every version it made at
    # load (on CUDA each runner compiles with an inductor backend equal to the others', as these
    # share the first one's)
    made = []
    for _ in range(2):
        r = ModelRunner(runners[0].model, num_blocks=48, block_size=BS, pad_decode=True, attention="flex")
        r.flex = FlexPaged(r, backend=backends[0])
        before = len(versions)
        r.warm_up()
        assert r.attention == "flex" and r.attention_fallback is None
        made.append(len(versions) - before)
    assert made == [0, 0], f"runners sharing one model's weights compiled versions of their own: {made}"
    assert len(versions) <= torch._dynamo.config.recompile_limit


def test_a_busy_machine_does_not_make_compiled_code_compile_again(weights, fresh_dynamo):
    # dynamo guards every compiled version on torch's thread count, and the CPU contention guard
    # runs steps on one thread after a slowed step: around compiled code that compiled a new
    # version inside a request (with fullgraph flex it hit the recompile limit under load)
    from pipeline_dsl.engine.compute import Contention, ContentionGuard
    from pipeline_dsl.engine.flex import FlexPaged

    versions = []
    r = ModelRunner(LlamaModel(weights.config, weights.weights, "fp32"), num_blocks=48, block_size=BS,
                    pad_decode=True, attention="flex")
    r.flex = FlexPaged(r, backend=counting_backend(versions))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r.warm_up()
        at_load = len(versions)
        busy = Contention(ContentionGuard.SOLO_STEPS)
        busy.solo = 1000                                  # as after a step another process slowed
        r.guard = ContentionGuard(contention=busy)
        rng = random.Random(3)
        with torch.inference_mode():
            for _ in range(6):
                step = r.prepare(StepBatch.from_items(random_step(rng, 100, r.num_blocks)))
                step.slots.fill_(r.num_slots)
                r.run(step, graphs=False)
        assert len(versions) == at_load and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_kernel_tiles_divide_the_block_masks_blocks_and_shrink_on_small_shared_memory():
    # inductor refuses a BLOCK_M / BLOCK_N that does not divide the mask's query / KV blocks,
    # which torch's own sm90 default (128 x 128) does not for 16-row query blocks
    from pipeline_dsl.engine.flex import kernel_options

    h100 = 227 * 1024                                      # opt-in shared memory per block
    for bs in (16, 32, 64, 128, 256):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for smem in (h100, 99 * 1024, None):
                o = kernel_options(bs, dtype, smem)
                assert o["BLOCK_M"] == Q_BLOCK and Q_BLOCK % o["BLOCK_M"] == 0 and bs % o["BLOCK_N"] == 0
                assert o["FORCE_USE_FLEX_ATTENTION"] is True
    assert kernel_options(16, torch.bfloat16, h100)["BLOCK_N"] == 16      # the default block size
    assert kernel_options(128, torch.bfloat16, h100)["BLOCK_N"] == 64
    assert kernel_options(128, torch.bfloat16, 99 * 1024)["BLOCK_N"] == 32
    assert kernel_options(128, torch.float32, h100)["BLOCK_N"] == 32
