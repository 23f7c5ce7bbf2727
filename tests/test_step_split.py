"""bench/step_split.py: a decode step's parts from the executor's trace."""
from pathlib import Path

import pytest

from pipeline_dsl.engine.trace import Trace

ROOT = Path(__file__).resolve().parents[1]


def test_a_steps_parts_and_waits_add_up_to_its_period(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from step_split import split

    tr = Trace()
    tr.add("host", "batch.schedule", 0.5, 0.6, 0)          # before the run: left out
    t = 1.0
    for m, forward in enumerate((0.5, 0.010, 0.012, 0.011)):   # the prefill, then three decodes
        tr.add("host", "batch.schedule", t, t + 0.001, m)
        tr.add("compute", "gen.forward", t + 0.002, t + 0.002 + forward, m)
        tr.add("host", "gen.emit", t + 0.003 + forward, t + 0.004 + forward, m)
        t += 0.005 + forward                                 # 3 ms outside every work
    tr.add("requests", "gen.generate", 1.0, t, -1, lane=True)
    per, prefill = split(tr.work(), 1.0)
    assert prefill == pytest.approx(0.5)
    assert per["forward"] == pytest.approx([0.010, 0.012])   # the last step has no next: no period
    assert per["period"] == pytest.approx([0.015, 0.017])
    assert per["schedule"] == pytest.approx([0.001, 0.001]) and per["emit"] == pytest.approx([0.001, 0.001])
    assert per["waits"] == pytest.approx([0.003, 0.003])
    assert per["lookup"] == [0.0, 0.0]
