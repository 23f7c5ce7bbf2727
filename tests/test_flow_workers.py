"""The retry rules of a stage that runs user code (docs/language.md, "Python stages": `retries`
with `backoff`), as flow/workers.py implements them: which failures are transient, and how
long a retry waits."""
from __future__ import annotations

import random

import pytest

import pipeline_dsl
from pipeline_dsl.flow.workers import MAX_BACKOFF_S, StageTimeout, backoff_delay, is_transient


def with_status(value, path=("status_code",)):
    class HTTPError(Exception):
        pass
    exc = HTTPError("http")
    if len(path) == 1:
        setattr(exc, path[0], value)
    else:
        response = type("Response", (), {})()
        setattr(response, path[1], value)
        setattr(exc, path[0], response)
    return exc


@pytest.mark.parametrize("exc", [
    TimeoutError("slow"), StageTimeout("past its timeout"), ConnectionError("reset"),
    ConnectionResetError("reset"), pipeline_dsl.Retry("busy"),
    with_status(408), with_status(425), with_status(429), with_status(500), with_status(503), with_status(599),
    with_status(502, ("status",)), with_status(429, ("response", "status_code")),
], ids=repr)
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ValueError("a bug"), pipeline_dsl.Reject("no"), KeyboardInterrupt(), with_status(404), with_status(400),
    with_status(499), with_status(600), with_status(True), with_status("503"),
    with_status(404, ("response", "status_code")),
], ids=repr)
def test_other_failures_fail_at_once(exc):
    assert not is_transient(exc)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_a_retry_waits_backoff_doubled_per_try_jittered_into_half_to_whole(attempt):
    rng = random.getstate()
    random.seed(attempt)
    try:
        delays = [backoff_delay(0.2, attempt) for _ in range(400)]
    finally:
        random.setstate(rng)
    full = 0.2 * 2 ** (attempt - 1)          # the first retry waits about `backoff`
    assert all(full / 2 <= d <= full for d in delays)
    assert min(delays) < 0.6 * full and max(delays) > 0.9 * full       # the whole range, not a part


def test_a_retry_waits_at_most_30_seconds():
    assert MAX_BACKOFF_S == 30.0
    rng = random.getstate()
    random.seed(0)
    try:
        delays = [backoff_delay(1.0, 12) for _ in range(200)]      # 2048 s before the cap
    finally:
        random.setstate(rng)
    assert all(15.0 <= d <= 30.0 for d in delays) and max(delays) > 27.0
