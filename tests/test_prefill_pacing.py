"""Prefill paced by time: while sequences decode, a step's prefill tokens are cut to what the
engine measured it computes within `itl_target_s` (a long prompt on a slow CPU no longer makes
every other stream wait seconds for its next token), and nothing changes when nobody decodes,
when the target is 0, or before anything was measured."""
import time

import pytest

from pipeline_dsl.engine import Engine, EngineConfig, InputError, SamplingParams
from pipeline_dsl.engine.kv_cache import BlockManager
from pipeline_dsl.engine.scheduler import Scheduler, Sequence
from test_engine import ToyRunner, ToyTokenizer


def make(**cfg):
    config = EngineConfig(**{"batch_timeout_s": 0.0, "max_batch_size": 4, "prefill_chunk": 256, **cfg})
    return Scheduler(config, BlockManager(256, 4), clock=lambda: 0.0)


def seq(rid, n, max_tokens=8):
    return Sequence(rid, list(range(1000 * (1 + len(rid)), 1000 * (1 + len(rid)) + n)), n,
                    SamplingParams(max_tokens=max_tokens), 0.0)


def decoding(sched):
    """A sequence past its prompt: it decodes one token a step from now on."""
    s = seq("v", 5)
    sched.add(s)
    out = sched.schedule()
    sched.update(out, [7] * out.num_sample)
    assert len(s.token_ids) - s.num_computed == 1
    return s


def measured(sched, fixed=0.1, per_token=0.01):
    for _ in range(3):
        sched.observe(0, fixed)
        sched.observe(64, fixed + 64 * per_token)


def test_a_long_prompt_beside_a_decoder_takes_what_fits_in_the_target():
    sched = make(itl_target_s=0.5)
    decoding(sched)
    measured(sched)                          # 0.1 s fixed + 0.01 s a prompt token
    assert sched.prefill_cap() == 40         # (0.5 - 0.1) / 0.01
    sched.add(seq("long", 1000))
    sched.add(seq("other", 300))
    out = sched.schedule()
    assert out.num_decodes == 1 and out.num_prefill_tokens == 40   # both prompts share the 40
    sched.update(out, [7] * out.num_sample)
    assert sched.schedule().num_prefill_tokens == 40


def test_without_a_decoder_the_prompt_takes_its_whole_chunk():
    sched = make(itl_target_s=0.5)
    measured(sched)
    sched.add(seq("long", 1000))
    out = sched.schedule()
    assert out.num_decodes == 0 and out.num_prefill_tokens == 256


@pytest.mark.parametrize("target, measure", [(0.0, True), (0.5, False)], ids=["target 0", "nothing measured"])
def test_no_cut_when_the_target_is_off_or_nothing_was_measured(target, measure):
    sched = make(itl_target_s=target)
    decoding(sched)
    if measure:
        measured(sched)
    sched.add(seq("long", 1000))
    assert sched.schedule().num_prefill_tokens == 256


def test_before_any_prefill_was_measured_a_step_beside_decoders_takes_four_blocks():
    sched = make(itl_target_s=0.5)
    decoding(sched)
    sched.observe(0, 0.01)                    # decode steps measured, no prefill yet
    sched.add(seq("long", 1000))
    assert sched.schedule().num_prefill_tokens == 16      # 4 blocks of 4


def test_the_cut_keeps_at_least_a_block_and_few_rows_are_not_a_measurement():
    sched = make(itl_target_s=0.05)
    decoding(sched)
    sched.observe(2, 50.0)                    # 2 rows: overhead, not a cost per token
    assert sched.prefill_cap() is None        # nothing measured yet
    measured(sched, fixed=0.1, per_token=0.05)   # the fixed part alone exceeds the target
    assert sched.prefill_cap() == 4           # one block (block_size 4)
    sched.add(seq("long", 100))
    assert sched.schedule().num_prefill_tokens == 4


def test_a_dearer_latest_piece_sets_the_cut_over_the_median_of_cheaper_ones():
    # a long prompt's later pieces attend to more context: the latest cost per token, when above
    # the median of the last ones, is the one the cut is sized by
    sched = make(itl_target_s=0.5)
    measured(sched, fixed=0.1, per_token=0.001)              # 0.4 s of room: 400 tokens at this cost
    assert 390 <= sched.prefill_cap() <= 400
    sched.observe(64, 0.1 + 64 * 0.004)                      # the latest piece: four times the cost
    assert 95 <= sched.prefill_cap() <= 100


def test_a_step_of_decodes_alone_never_works_out_the_cap_and_one_with_a_prompt_does():
    # the cap (medians of recent steps) matters only to a prompt piece: a lone request's decode
    # steps do not pay for it, a prompt arriving beside them is cut as before
    sched = make(itl_target_s=0.5)
    decoding(sched)
    measured(sched)
    asked = []
    cap = sched.prefill_cap
    sched.prefill_cap = lambda: asked.append(1) or cap()
    for _ in range(3):
        out = sched.schedule()
        assert out.num_decodes == 1 and out.num_prefill_tokens == 0
        sched.update(out, [7] * out.num_sample)
    assert asked == []
    sched.add(seq("long", 1000))
    out = sched.schedule()
    assert out.num_decodes == 1 and out.num_prefill_tokens == 40 and asked == [1]   # once a step


def test_a_bad_target_is_an_input_error():
    with pytest.raises(InputError, match="itl_target"):
        EngineConfig(itl_target_s=-1)
    with pytest.raises(InputError, match="long_prefill_threshold"):
        EngineConfig(long_prefill_threshold=-1)


class SlowPrefill(ToyRunner):
    """The toy model, taking 2 ms for each prompt row it computes (decode rows are free)."""

    def execute(self, items):
        time.sleep(0.002 * sum(len(it.token_ids) for it in items if len(it.token_ids) > 1))
        return super().execute(items)


def test_the_engine_measures_its_steps_and_paces_a_long_prompt_beside_a_stream():
    """Through Engine.step: the engine times each forward; a 600-token prompt arriving while
    another request decodes is prefilled in pieces that fit 0.1 s (2 ms a row: at most 50),
    never the 256 of prefill_chunk, and both answers are those of an unpaced engine."""
    def answers(target):
        runner = SlowPrefill(num_blocks=256, block_size=4, max_model_len=1024)
        eng = Engine(EngineConfig(batch_timeout_s=0.0, itl_target_s=target, prefill_chunk=256,
                                  max_tokens_per_step=512), runner=runner, tokenizer=ToyTokenizer())
        eng.add_request("warm", prompt_token_ids=list(range(1, 65)), params=SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        eng.add_request("stream", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=60, ignore_eos=True))
        eng.step()
        eng.add_request("long", prompt_token_ids=[(i * 7) % 90 + 1 for i in range(600)],
                        params=SamplingParams(max_tokens=4, ignore_eos=True))
        got, sizes = {}, []
        while eng.has_unfinished():
            n_calls = len(runner.calls)
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
            sizes += [n for call in runner.calls[n_calls:] for n, _ in call if n > 1]
        return got, sizes

    paced, sizes = answers(0.1)
    unpaced, unpaced_sizes = answers(0.0)
    assert max(unpaced_sizes) == 256
    assert sizes and max(sizes) <= 50 and len(sizes) > 600 // 50
    assert paced == unpaced
