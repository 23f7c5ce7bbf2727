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
    assert "failed" not in table
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
        return {"tok_s": float(len(ps))}

    monkeypatch.setattr(gpu_suite, "engine_alone", engine_alone)
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out),
                           "--only", "batch sweep"]) == 0
    assert on_disk == [None, {"batch sweep 1": {"tok_s": 1.0}}]
    saved = json.loads(out.read_text())
    assert saved["complete"] and set(saved["rows"]) == {"batch sweep 1", "batch sweep 4"}
