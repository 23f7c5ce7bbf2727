"""bench/gpu_suite.py's smoke mode runs on CPU and prints every row of its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_smoke_prints_every_figure_on_cpu(tmp_path, monkeypatch, capsys):
    # the suite's main in this process, whose torch is imported already (a python of its own spent
    # ~3 s of CPU importing it again); its agp run and agp serve rows still start processes of
    # their own, as on a device. Its loaded runners, KV budget and deadline are this test's alone
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    import gpu_suite

    for name, fresh in (("RUNNERS", {}), ("LOAD_FAILED", {}), ("KV_BUDGET", list(gpu_suite.KV_BUDGET)),
                        ("DEADLINE", [None])):
        monkeypatch.setattr(gpu_suite, name, fresh)
    rc = gpu_suite.main(["--smoke", "--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr()
    assert rc == 0, out.out[-3000:] + out.err[-3000:]
    table = out.out[out.out.index("| figure"):]
    for row in ("engine alone, tiny, 8 x 8", "engine alone, tiny, agp run's 8 chat prompts x 8",
                "engine alone, tiny, agp serve's 8 chat prompts x 8", "transformers generate",
                "ratio engine / transformers", "batch sweep 1", "batch sweep 4", "streams overlapped",
                "streams serial", "ratio overlap on / off", "attention flex", "attention sdpa",
                "ratio attention flex / sdpa", "agp run balanced", "ratio agp run balanced / engine alone (same prompts)",
                "agp run performance", "agp serve balanced", "agp serve performance",
                # the second shape's rows (the Llama-3.2-1B shape's on a device), after the release
                "engine alone, tiny-mha, 8 x 8", "transformers generate, tiny-mha",
                "ratio engine / transformers, tiny-mha"):
        assert f"| {row}" in table, row
    assert "failed" not in table and "skipped" not in table
    done = out.out[out.out.index("| done when"):]
    figures = [line.strip("|").split(" | ") for line in done.splitlines()[2:] if line.startswith("| ")]
    assert [f[0].strip() for f in figures] == [
        "engine alone, tiny, tok/s", "engine alone / transformers, tiny",
        "engine alone, tiny-mha, tok/s", "engine alone / transformers, tiny-mha",
        "agp run balanced / engine alone (same prompts)", "agp run balanced, TTFT p50 ms",
        "agp run performance, TTFT p50 ms (no compile inside TTFT)", "one request alone, tok/s",
        "overlap on / off (graphs on both)", "copy time hidden under compute", "host time hidden under compute",
        "torch.compile versions made inside the timed engine runs", "agp serve 8 streams answered",
        "agp serve 8 streams, TTFT p50 ms", "agp serve 8 streams, streamed tok/s / engine alone (same prompts)"]
    for what, measured, target, met in (map(str.strip, f) for f in figures):
        assert target and measured not in ("", "not run") and met in ("yes", "no"), (what, measured, met)
        assert "differ" not in measured and "baseline" not in measured, (what, measured)   # like for like
    assert "| agp serve 8 streams answered | 8 | 8 | yes |" in done
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert rows["attention flex (engine alone, tiny)"]["attention"] == "flex"
    assert rows["attention sdpa (engine alone, tiny)"]["attention"] == "sdpa"
    # the pipeline's baselines ran the very token ids the pipeline encoded (agp run's answers and
    # the streams carry them back), as many tokens, and not the random prompts of the row
    run, run_base = rows["agp run balanced, 8 chat requests"], rows["engine alone, tiny, agp run's 8 chat prompts x 8"]
    assert run["ids_digest"] == run_base["ids_digest"] != rows["engine alone, tiny, 8 x 8"]["ids_digest"]
    assert run["tokens"] == run_base["tokens"] == 8 * 8 and run["answered"] == 8
    assert (run_base["step_tokens"], run_base["prefill_chunk"]) == (512, 256)      # the pipeline file's
    serve_row = rows["agp serve balanced, 4 / 8 streams x 8"]
    serve = serve_row[-1]
    serve_base = rows["engine alone, tiny, agp serve's 8 chat prompts x 8"]
    assert serve["ids_digest"] == serve_base["ids_digest"] and serve["tokens"] == serve_base["tokens"] == 8 * 8
    assert all(r["row_s"] >= 0 for r in rows.values() if isinstance(r, dict))     # recorded (a tiny row takes ~0 s)
    assert all(wave["row_s"] > 0 for wave in serve_row)                               # a serve row's, in each wave


def test_gpu_suite_tokenizer_folder_reads_back_as_the_embedded_models_tokenizer(tmp_path, monkeypatch):
    # the suite's model folders carry the embedded model's tokenizer (--make-tokenizer, bench/tok):
    # read back from the folder as `agp run` reads a Hugging Face model's, it encodes the chat
    # requests, digits, special tokens and any text, templates and stops as agp's tokenizer of the
    # GGUF file does
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite
    from pipeline_dsl.engine.gguf_loader import read_metadata
    from pipeline_dsl.engine.models import resolve_model
    from pipeline_dsl.engine.tokenizer import Tokenizer
    from pipeline_dsl.model_files import read_gguf_header

    gpu_suite.make_tokenizer(tmp_path / "tok")
    folder = Tokenizer.from_hf_folder(tmp_path / "tok")
    gguf = Tokenizer.from_gguf_metadata(read_metadata(read_gguf_header(resolve_model(None).path)))
    for attr in ("bos_token", "eos_token", "bos_token_id", "eos_token_id", "eos_token_ids", "add_bos", "add_eos",
                 "chat_template", "vocab_size", "special_ids", "added"):
        assert getattr(folder, attr) == getattr(gguf, attr), attr
    texts = [gguf.apply_chat_template(r["messages"]) for r in gpu_suite.chat_requests(8, 8)]
    texts += ["In 2024, 365 days and 12 months: 3.14159", "<|im_start|>user\nhi<|im_end|>\n", "  two\tspaces\n\n",
              "\u00e9moji \U0001f916, \u00fcn\u00efcode \u4e2d\u6587"]
    for text in texts:
        assert folder.encode(text) == gguf.encode(text), text
        assert folder.encode(text, add_special_tokens=False) == gguf.encode(text, add_special_tokens=False), text
        ids = gguf.encode(text)
        assert folder.decode(ids) == gguf.decode(ids) and folder.decode(ids, False) == gguf.decode(ids, False)


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
    assert len(on_disk) == 2 and on_disk[0] is None and set(on_disk[1]) == {"batch sweep 1"}
    first = on_disk[1]["batch sweep 1"]
    assert first.pop("row_s") >= 0                  # its seconds: ~0 for a faked row, more on a busy machine
    assert first == {"tok_s": 1.0, "ms_per_step": 1.0}
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


def test_gpu_suite_starts_no_row_its_estimate_would_carry_past_the_budget(tmp_path, monkeypatch):
    # an engine row in the suite's process cannot be cut short: it must not start unless its
    # estimate ends it within the budget and a minute
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "engine_alone", lambda folder, device, ps, new, **kw: {"tok_s": 1.0,
                                                                                          "ms_per_step": 1.0})
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    monkeypatch.setitem(gpu_suite.ESTIMATE_S, "run", 1000)
    out = tmp_path / "rows.json"
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out), "--budget", "100",
                           "--only", "batch sweep"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows["batch sweep 1"]["tok_s"] == 1.0 and "skipped" in rows["batch sweep 4"]


def test_gpu_suite_counts_its_budget_from_the_process_start(tmp_path, monkeypatch):
    # gpu_device.sh cuts the suite at its limit counted from the process's start: the budget, and a
    # subprocess row's deadline, count from there too, torch's import and the preflight included
    # (they counted from after them, so a slow import carried the rows past the cut)
    import time

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "engine_alone", lambda folder, device, ps, new, **kw: {"tok_s": 1.0,
                                                                                          "ms_per_step": 1.0})
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    monkeypatch.setattr(gpu_suite, "DEADLINE", [None])
    out = tmp_path / "rows.json"
    started = time.perf_counter() - 150              # 150 s spent before main: past the budget
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out), "--budget", "100",
                           "--only", "batch sweep"], started=started) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all("skipped" in r for r in rows.values()), rows
    assert gpu_suite.DEADLINE[0] == started + 100 + 60


def _saved_run(gpu_suite, value: str) -> dict:
    """A device run's saved rows (the real workload's names), every figure measured."""
    n, new, shapes, streams = 256, 128, ["smollm2-135m", "llama-3.2-1b"], [256, 512]
    nm = gpu_suite.names(n, new, shapes, streams)
    eng = {"tok_s": 9000.0, "ids_digest": "a", "tokens": n * new, "copy_hidden": 0.9, "host_hidden": 0.9,
           "compiled_in_run": 0}
    rows = {nm["engine"](s): dict(eng) for s in shapes}
    rows |= {nm["transformers"](s): {"tok_s": 3000.0} for s in shapes}
    rows[nm["run base"]] = {"tok_s": 8000.0, "ids_digest": "chat", "tokens": n * new}
    rows[nm["run"]("balanced")] = {"tok_s": 7000.0, "ttft_p50_ms": 900, "ids_digest": "chat", "tokens": n * new}
    rows[nm["run"]("performance")] = {"tok_s": 7000.0, "ttft_p50_ms": 900}
    rows[nm["serve base"]] = {"tok_s": 8000.0, "ids_digest": "streams", "tokens": 512 * 64}
    rows[nm["serve"]("balanced")] = [{"answered": 512, "ttft_p50_ms": 1000, "stream_tok_s": 6000.0,
                                      "ids_digest": "streams", "tokens": 512 * 64}]
    rows |= {nm[k]: dict(eng) for k in ("one", "on", "off")}
    table = [(name, value) for name in rows] + [(f"batch sweep {b}", value) for b in (16, 64, 256)]
    return {"device": "NVIDIA H200", "torch": "2.11", "date": "2026-12-05 08:00", "wall_s": 480, "complete": True,
            "rows": rows, "table": table, "workload": {"n": n, "new": new, "shapes": shapes, "streams": streams}}


def test_gpu_suite_tables_fit_in_what_a_device_command_returns(capsys, monkeypatch):
    # a device command returns its output's last 12,000 characters; bench/gpu_device.sh prints a
    # few setup lines and then these tables, however long the rows' own values are
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    gpu_suite.print_tables(_saved_run(gpu_suite, "9,000 tok/s " * 60))
    printed = capsys.readouterr().out
    assert len(printed) < 10_000 and max(map(len, printed.splitlines())) < 260
    assert "| agp run balanced / engine alone (same prompts) | 88% | >= 85 % | yes |" in printed
    assert "| agp serve 512 streams, streamed tok/s / engine alone (same prompts) | 75% | >= 70 % | yes |" in printed


def test_gpu_suite_refuses_a_pipeline_ratio_over_other_prompts_than_its_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    saved = _saved_run(gpu_suite, "x")
    nm = gpu_suite.names(256, 128, saved["workload"]["shapes"], saved["workload"]["streams"])
    saved["rows"][nm["run base"]]["ids_digest"] = "random"               # the random-token prompts
    saved["rows"][nm["serve base"]]["tokens"] = 512 * 128                 # more tokens a prompt than the streams
    done = {f[0]: f[1:] for f in gpu_suite.done_when(saved["rows"], 256, 128, saved["workload"]["shapes"],
                                                      saved["workload"]["streams"])}
    assert done["agp run balanced / engine alone (same prompts)"] == ("prompts differ from the baseline's",
                                                                      ">= 85 %", "no")
    assert done["agp serve 512 streams, streamed tok/s / engine alone (same prompts)"] == (
        "32768 tokens, the baseline 65536", ">= 70 %", "no")


def test_gpu_device_script_ends_with_both_tables_however_much_the_rows_print(tmp_path, monkeypatch):
    # a device command returns only its output's last 12,000 characters: the suite's lines and its
    # stderr (torch warnings, TORCH_LOGS) go to files under $OUT, the tables come last on stdout
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(_saved_run(gpu_suite, "9,000 tok/s")))
    fake = tmp_path / "bin" / "python3"                  # the device's python3: the suite row is faked
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
if "--tokenizer" in args:
    for i in range(3000):
        print(f"W1205 a torch warning, line {{i}}, long enough to fill a device's output limit", file=sys.stderr)
        print(f"row line {{i}}")
    shutil.copy({str(saved)!r}, args[args.index("--json") + 1])
elif args[:2] == ["-m", "pip"] or args[:1] == ["-c"]:
    pass
else:
    os.execv({sys.executable!r}, [{sys.executable!r}] + args)
""")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               PYTHONPATH=str(ROOT))
    out = subprocess.run(["sh", str(ROOT / "bench" / "gpu_device.sh")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(out.stdout) < 12_000 and "W1205" not in out.stdout and "row line" not in out.stdout
    assert out.stdout.index("| figure") < out.stdout.index("| done when")
    assert out.stdout.rstrip().endswith("| agp serve 512 streams, streamed tok/s / engine alone (same prompts) "
                                        "| 75% | >= 70 % | yes |")
    assert "W1205" in (tmp_path / "out" / "gpu.stderr").read_text()


def test_gpu_device_script_goes_on_when_a_setup_step_hangs(tmp_path):
    # a wedged nvidia-smi or a python that hangs importing torch must not take the command's 600 s:
    # each step around the suite has its own limit, and the tables still come last
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 1000\n")
    (fake / "python3").write_text(f"""#!{sys.executable}
import os, sys, time
args = sys.argv[1:]
if args[:1] == ["-c"]:
    time.sleep(1000)                                  # the version line: hangs
elif "--tokenizer" in args:
    open(args[args.index("--json") + 1], "w").write({json.dumps(json.dumps(
        {"device": "x", "torch": "t", "date": "d", "wall_s": 1, "complete": True, "rows": {},
         "table": [["a row", "1 tok/s"]], "workload": {"n": 256, "new": 128, "shapes": ["s", "l"],
                                                        "streams": [256, 512]}}))})
elif args[:2] == ["-m", "pip"]:
    pass
else:
    os.execv({sys.executable!r}, [{sys.executable!r}] + args)
""")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), PYTHONPATH=str(ROOT),
               STEP="0.2")   # the two hangs cost 2 x STEP; the tables after them have their own limit (TABLE_S)
    out = subprocess.run(["sh", str(ROOT / "bench" / "gpu_device.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| a row | 1 tok/s |" in out.stdout and "| done when" in out.stdout


def test_gpu_suite_preflight_names_a_module_that_is_there_but_does_not_import(tmp_path, monkeypatch):
    # a carried wheel can be found and still fail against the image's packages (pydantic-core and an
    # older typing_extensions): the preflight says so before the first row, not the serve row later
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    (tmp_path / "agp_broken_wheel.py").write_text(
        "raise ImportError(\"cannot import name 'Sentinel' from 'typing_extensions'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gpu_suite, "PREFLIGHT_MODULES", ("json", "agp_broken_wheel"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    problems = gpu_suite.preflight(tmp_path / "tok")
    assert len(problems) == 1 and "agp_broken_wheel does not import" in problems[0] and "Sentinel" in problems[0]


def test_gpu_suite_tries_a_failed_load_once_and_fails_the_rows_after_it_at_once(tmp_path, monkeypatch):
    # every engine row of a model shares its load (minutes of compile and capture on a device): one
    # that failed is not tried again by each row, which would spend the budget failing
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite
    from pipeline_dsl.engine import engine

    loads = []

    def load_runner(cfg):
        loads.append(cfg.model)
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(engine, "load_runner", load_runner)
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    monkeypatch.setattr(gpu_suite, "RUNNERS", {})
    monkeypatch.setattr(gpu_suite, "LOAD_FAILED", {})
    out = tmp_path / "rows.json"
    assert gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out), "--only", "batch sweep"]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert len(loads) == 1
    assert rows["batch sweep 1"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert rows["batch sweep 4"]["error"] == ("RuntimeError: its model's load failed in an earlier row: "
                                              "RuntimeError: CUDA error: out of memory")


def test_gpu_suite_serve_row_ends_within_its_time_when_the_streams_do_not(tmp_path, monkeypatch):
    # a server that never answers its streams ends the row at the suite's deadline, not the suite
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import asyncio
    import time

    import gpu_suite
    import serve_load

    seen = {}

    class Server:
        port = 1

        def __init__(self, pipeline, startup_s=300):
            seen["startup_s"] = startup_s

        def terminate(self, timeout=120):
            seen["terminate_s"] = timeout

    async def streams(port, n, new):
        await asyncio.sleep(5)
        return {"streams": n}

    monkeypatch.setattr(serve_load, "Server", Server)
    monkeypatch.setattr(gpu_suite, "serve_streams", streams)
    monkeypatch.setattr(gpu_suite, "ROW_MIN_S", 0.5)
    monkeypatch.setattr(gpu_suite, "DEADLINE", [time.perf_counter() + 1])
    with pytest.raises(RuntimeError, match="4 streams not answered within the row's 1 s"):   # not their answer
        gpu_suite.agp_serve(tmp_path / "p.agp", (4, 8), 8)
    assert seen["startup_s"] <= 1 and seen["terminate_s"] <= 10


def test_gpu_suite_cut_by_the_device_scripts_limit_names_the_row_it_stopped(tmp_path, monkeypatch):
    # gpu_device.sh stops the suite with SIGINT at its limit: the saved rows, and so the tables printed
    # after, say which row was running then, instead of leaving it out as if it had never started
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    def engine_alone(folder, device, ps, new, **kw):
        if kw.get("batch") == 4:
            raise KeyboardInterrupt
        return {"tok_s": 1.0, "ms_per_step": 1.0}

    monkeypatch.setattr(gpu_suite, "engine_alone", engine_alone)
    monkeypatch.setattr(gpu_suite, "make_model", lambda shape, tok, folder, device: folder)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(["--smoke", "--tokenizer", str(tmp_path), "--json", str(out), "--only", "batch sweep"])
    saved = json.loads(out.read_text())
    assert not saved["complete"] and saved["rows"]["batch sweep 1"]["tok_s"] == 1.0
    assert saved["rows"]["batch sweep 4"]["error"].startswith("stopped by the time limit after")
    assert ["batch sweep 4", "failed: stopped by the time limit after 0 s"] in saved["table"]


PROXIES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _proxy_nowhere(monkeypatch) -> None:
    """A machine whose environment names a proxy (nothing listens there) and no NO_PROXY."""
    for var in PROXIES:
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_gpu_suite_streams_reach_the_loopback_server_whatever_proxy_the_machine_names(monkeypatch):
    # httpx sends even 127.0.0.1 through a proxy the environment names: on a device whose image
    # sets one, every stream of the serve rows failed to connect and none was answered
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    class Streams(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(body["max_tokens"]):
                chunk = {"choices": [{"delta": {"content": "a"}, "token_ids": [i]}], "prompt_token_ids": [1, 2]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Streams)
    # polled every 10 ms: shutdown() waits a poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    _proxy_nowhere(monkeypatch)
    try:
        got = asyncio.run(gpu_suite.serve_streams(server.server_port, 3, 4))
    finally:
        server.shutdown()
    assert (got["answered"], got["tokens"]) == (3, 12)


def test_serve_load_server_is_reached_on_loopback_whatever_proxy_the_machine_names(monkeypatch):
    # the suite's serve rows wait for `agp serve` through Server's health check: through a proxy it
    # never answered, and each row waited its whole start-up time before failing
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import serve_load

    _proxy_nowhere(monkeypatch)
    health = ("import http.server, sys\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
              "    def log_message(self, *args): pass\n"
              "http.server.HTTPServer(('127.0.0.1', int(sys.argv[-1])), H).serve_forever()\n")
    server = serve_load.Server("unused.agp", startup_s=20, python=("-c", health))   # argv: serve, file, --port N
    try:
        assert server.get("/health").status_code == 200
    finally:
        server.terminate(timeout=5)
