"""`agp run --stats`'s printed summary: a stage's timeouts, retries and cache hits appear on its
row, from the counters the runtime keeps, only where they are non-zero."""
from pipeline_dsl.commands.runner import format_summary
from pipeline_dsl.flow.stats import StageCounter


def _summary(stages: dict) -> list[str]:
    s = {"requests": 3, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
         "output_tokens_per_s": None, "generation_s": 0, "ttft_p50_ms": None, "ttft_p99_ms": None,
         "tpot_p50_ms": None, "tpot_p99_ms": None, "mean_batch_size": None, "kv_hit_rate": None,
         "stages": stages}
    return format_summary(s).splitlines()


def _row(lines: list[str], name: str) -> str:
    return next(x for x in lines if x.strip().startswith(name + " "))


def test_the_run_summary_shows_a_stages_timeouts_retries_and_cache_hits():
    busy = StageCounter(items_in=3, failed=1, timeouts=2, retries=3, cache_hits=4).row("python")
    quiet = StageCounter(items_in=3, items_out=3).row("python")
    lines = _summary({"lookup": busy, "guard": quiet})
    assert _row(lines, "lookup").endswith("timeouts 2  retries 3  cache hits 4")
    row = _row(lines, "guard")
    assert "timeouts" not in row and "retries" not in row and "cache hits" not in row
