"""bench/gpu_suite.py's smoke mode runs on CPU and prints every row of its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_smoke_prints_every_figure_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--smoke", "--json",
                          str(tmp_path / "rows.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| figure"):]
    for row in ("engine alone", "transformers generate", "ratio engine / transformers", "batch sweep 1",
                "streams overlapped", "streams serial", "ratio overlap on / off", "attention flex",
                "attention sdpa", "ratio attention flex / sdpa", "agp run balanced",
                "agp run performance", "agp serve"):
        assert f"| {row}" in table, row
    assert "failed" not in table and "skipped" not in table
    done = out.stdout[out.stdout.index("| done when"):]
    for figure in ("engine alone, tiny, tok/s", "engine alone / transformers, tiny", "agp run balanced / engine alone",
                   "agp run balanced, TTFT p50 ms", "agp run performance, TTFT p50 ms", "one request alone, tok/s",
                   "overlap on / off", "copy time hidden under compute", "host time hidden under compute",
                   "agp serve 8 streams answered", "agp serve 8 streams, TTFT p50 ms",
                   "agp serve 8 streams, streamed tok/s / engine alone",
                   "torch.compile versions made inside the timed engine runs"):
        line = next(x for x in done.splitlines() if x.startswith(f"| {figure}"))
        assert line.endswith(("| yes |", "| no |")), line           # measured, not "not run"
    assert "| agp serve 8 streams answered | 8 | 8 | yes |" in done
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert rows["attention flex (engine alone, tiny)"]["attention"] == "flex"
    assert rows["attention sdpa (engine alone, tiny)"]["attention"] == "sdpa"


def test_gpu_suite_saves_each_row_as_it_finishes_and_runs_only_the_rows_asked(tmp_path, monkeypatch):
    # a device run cut short by its time limit keeps the rows it finished; --only reruns a few
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    out, on_disk = tmp_path / "rows.json", []

    def engine_alone(folder, device, ps, new, **kw):
        on_disk.append(json.loads(out.read_text())["rows"] if out.exists() else None)
        return {"tok_s": float(len(ps)), "ms_per_step": 1.0}

    monkeypatch.setattr(gpu_suite, "engine_alone", engine_alone)
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out),
                           "--only", "batch sweep"]) == 0
    assert on_disk == [None, {"batch sweep 1": {"tok_s": 1.0, "ms_per_step": 1.0}}]
    saved = json.loads(out.read_text())
    assert saved["complete"] and set(saved["rows"]) == {"batch sweep 1", "batch sweep 4"}


def test_gpu_suite_past_its_time_budget_skips_the_rows_left_and_still_prints_both_tables(tmp_path, monkeypatch,
                                                                                         capsys):
    # a device command runs at most 600 s: rows not started in time are marked, and a saved run's
    # tables print again from its JSON (--table) when the command was cut short
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    out = tmp_path / "rows.json"
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out), "--budget", "0"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["rows"] and all("skipped" in r for r in saved["rows"].values())
    assert "| batch sweep 1 | skipped: time budget spent" in printed
    assert "| one request alone, tok/s | not run | >= 600 | - |" in printed
    assert gpu_suite.main(["--table", str(out)]) == 0
    again = capsys.readouterr().out
    assert again[again.index("| figure"):] == printed[printed.index("| figure"):]
