"""Shared fixtures. `tiny_gguf`: path of a tiny random Llama GGUF (written once per session).

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`): a module's
tests stay together on one worker (its module fixtures — servers, clusters — start once), a
worker's torch, and each `agp` process a test starts, runs on one thread (two processes of two
threads each on two cores would wait at every barrier; `torch_threads_put_back` restores it
after a test that changed it), a worker reads the embedded model's file once
(`embedded_model_read_once`), the modules that start a local Ray cluster take turns
(`ray_turn`), and the longest modules are collected first (`LONG_FIRST`)."""

import fcntl
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from tiny_model import write_tiny_gguf

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    # and so do the `agp` processes its tests start (cpus.default_threads keeps OMP_NUM_THREADS):
    # two of two threads each beside the two workers would wait at every barrier as well
    os.environ.setdefault("OMP_NUM_THREADS", "1")
TORCH_THREADS = torch.get_num_threads()       # the process's count: one on a worker



def pytest_configure(config):
    """A suite started in the background (`make test &`, nohup, a CI runner) has SIGINT or SIGHUP
    ignored, and a child inherits an ignored signal: agp keeps a stop signal ignored on entry as
    nohup asks (stopping.heeded), so the agp processes the tests stop with one would not stop. The
    process that runs tests goes on ignoring it (a handler that does nothing), and its children,
    whose handlers exec resets, start with its default, as from a terminal; the tests that raise
    one in this process find it heeded. xdist's controller keeps it ignored: its workers inherit
    that, and nohup still keeps them running when the terminal closes."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: None)

# The modules that take longest (15 s to a minute and a half of tests each), longest first, by the
# sums of the per-test times per module (2026-12-07, an idle full run, the native kernels on an AVX2 CPU).
# `make test` gives each worker a module at a time in the order collected (--no-loadscope-reorder):
# these start first and the short modules fill in around them, where in the order of names one of
# them could start last and run alone while the other worker sits idle.
LONG_FIRST = ("test_ray.py", "test_slow_clients.py", "test_hostile.py", "test_gpu_suite.py", "test_dsl_limits.py",
              "test_fast_paths.py", "test_bench.py", "test_serve.py", "test_run_errors.py", "test_model_parity.py",
              "test_signals.py", "test_gpu_path.py", "test_flex_attention.py", "test_embeddings.py",
              "test_speculate.py", "test_flow_property.py", "test_ops.py", "test_examples.py", "test_executor.py",
              "test_openapi.py")


def pytest_collection_modifyitems(items):
    """LONG_FIRST's modules first, in its order; the rest after them as collected."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def torch_threads_put_back():
    """torch's thread count is the process's again after every test: an engine built with
    `threads = 2` (or a test that sets the count) would otherwise leave every later test of the
    worker on two threads, each forward waiting at a barrier for the core the other worker holds."""
    yield
    if torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


LOGGERS = ("", "agp", "agp.access", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture(autouse=True)
def logging_put_back():
    """The loggers `agp serve` configures (serve.logs.configure: agp's, uvicorn's, the root) and
    warnings.showwarning are as they were after every test: a test that runs `agp serve`'s main
    in this process (a flag refused after the logs were set up) or configures them itself left
    every in-process server of the tests after it logging at INFO to the stderr of the moment,
    and a line written between tests went past pytest's capture onto the run's output."""
    import logging
    import warnings

    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in map(logging.getLogger, LOGGERS)]
    shown = warnings.showwarning
    yield
    warnings.showwarning = shown
    for lg, handlers, level, propagate in saved:
        if lg.handlers != handlers or lg.level != level or lg.propagate != propagate:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


@pytest.fixture(scope="module")
def ray_turn():
    """Held while a module's local Ray cluster runs: one cluster at a time on this machine."""
    with open(os.path.join(tempfile.gettempdir(), "agp-tests-ray.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def embedded_model_read_once():
    """The embedded model's file read and dequantised once per worker process: reading it is
    most of a load (header, 4-bit blocks to float32: tens of seconds on a busy machine), and
    engines, runtimes and servers in a dozen modules load it in process. Each load still gets
    its own copy of the weights (nothing a test does to one model reaches another), its own
    tokenizer and its own model, in whatever dtype it asks for; the loader's own tests call
    `load_gguf` as they imported it, and a child process (`agp(...)`) reads the file itself."""
    from dataclasses import replace

    from pipeline_dsl.engine import gguf_loader
    from pipeline_dsl.model_files import EMBEDDED_FILES, embedded_file

    embedded = {path.resolve() for path in map(embedded_file, EMBEDDED_FILES) if path is not None}
    read, first = gguf_loader.load_gguf, {}

    def load_gguf(path):
        key = Path(path).resolve()
        if key not in embedded:
            return read(path)
        if key not in first:
            first[key] = read(path)
        g = first[key]
        weights = gguf_loader.Weights({name: w.clone() for name, w in g.weights.items()})
        weights.int4.update(g.weights.int4)           # blocks are only read (Int4Linear packs copies)
        return replace(g, weights=weights, metadata=dict(g.metadata))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_loader, "load_gguf", load_gguf)
        yield


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def soft_gguf(tmp_path_factory):
    """The tiny model with a small embedding scale: its next-token distributions are spread
    (top token ~0.1), so sampling with different seeds or temperatures gives different text."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "soft.gguf", embed_scale=0.2)


@pytest.fixture(scope="session")
def long_gguf(tmp_path_factory):
    """The tiny model with a 4096-token context: room for a tool prompt or a long answer."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "long.gguf", context=4096)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models: more threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_flowkit():
    """tests/flowkit.py's gates and counters empty for the test, its gates opened after it."""
    import flowkit

    flowkit.reset()
    yield
    flowkit.open_gates()
