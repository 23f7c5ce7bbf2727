"""Without a C++ compiler (or a CPU with neither AVX-512 nor AVX2 + FMA) the native kernels are
not built: one warning line, and the runner runs its eager path."""

import os
import stat
import time
import warnings
from pathlib import Path

import pytest

from pipeline_dsl.engine import native
from pipeline_dsl.engine.gguf_loader import load_gguf
from pipeline_dsl.engine.model import LlamaModel, ModelRunner, SeqBatchItem


def test_no_compiler_warns_once_in_one_line_and_runs_eagerly(monkeypatch, tiny_gguf):
    monkeypatch.delenv("AGP_NATIVE", raising=False)
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "cpu_supported", lambda: True)
    monkeypatch.setattr(native, "_WARNED", set())
    native.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.load() is None
            assert native.load() is None                    # decided once
            tiny = load_gguf(tiny_gguf)
            runner = ModelRunner(LlamaModel(tiny.config, tiny.weights, "fp32"), num_blocks=8, block_size=4)
        msgs = [str(w.message) for w in caught if "compiler" in str(w.message)]
        assert len(msgs) == 1 and "\n" not in msgs[0] and "eagerly" in msgs[0]
        assert runner.native is None
        ids = [5, 6, 7, 8, 9]
        out = runner.execute([SeqBatchItem(ids, 0, [0, 1], True)])
        assert out.shape == (1, tiny.config.vocab_size)
    finally:
        native.reset()


def test_the_kernels_run_on_an_avx2_cpu_without_avx512(monkeypatch):
    """AVX2 with FMA is enough: kernels.cpp's 16 lanes are two AVX2 registers there, and
    its int8 dot products (pmaddubsw) pay, so the int4 / Q8 linears take int8 inputs."""
    flags = native.cpu_flags()
    if "avx512f" in flags or not {"avx2", "fma"} <= flags or native.compiler() is None:
        pytest.skip("not an AVX2 CPU without AVX-512, or no compiler")
    monkeypatch.delenv("AGP_NATIVE", raising=False)
    monkeypatch.delenv("AGP_NATIVE_ACT", raising=False)
    native.reset()
    try:
        assert native.cpu_supported()
        assert native.load() is not None
        assert native.int8_activations() and native.activation_parts() == 2
    finally:
        native.reset()


def test_the_library_name_follows_the_source(monkeypatch, tmp_path):
    src = tmp_path / "kernels.cpp"
    src.write_text("int x;")
    monkeypatch.setattr(native, "SOURCE", src)
    a = native.library_path("g++")
    src.write_text("int y;")
    assert native.library_path("g++") != a                 # a changed source is rebuilt, never reused


def _fake_compiler(monkeypatch, seconds: float = 0.0):
    """build()'s compiler call writes its output file after `seconds` (the real one takes ~30 s)."""
    import subprocess

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        time.sleep(seconds)
        Path(cmd[-1]).write_bytes(b"\x7fELF")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native, "compiler", lambda: "g++")
    monkeypatch.setattr(native.subprocess, "run", run)
    return calls


def test_a_read_only_install_builds_the_library_in_the_users_cache_then_the_temporary_folder(monkeypatch, tmp_path):
    """In a container whose image is read-only the build folder beside the package cannot be
    made: the kernels were given up (the decode step ran eagerly, several times slower). They
    are built in $XDG_CACHE_HOME/agp/native, else in a private folder of TMPDIR; a second
    process finds the library there and builds nothing."""
    import tempfile

    calls = _fake_compiler(monkeypatch)
    (tmp_path / "image").write_text("a file: nothing can be made under it")
    monkeypatch.setattr(native, "BUILD", tmp_path / "image" / "build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = native.build()
    assert out.parent == tmp_path / "cache" / "agp" / "native" and out.exists()
    assert native.build() == out and len(calls) == 1                       # found, not built again

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "image" / "cache"))   # no writable home either
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = native.build()
    assert out.parent == tmp_path / "tmp" / f"agp-native-{os.getuid()}" and out.exists()
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")          # ignored, as the XDG spec says
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(native.os.path, "expanduser", lambda p: p)    # a uid with no home: "~" stays "~"
    assert native.folders() == [native.BUILD, out.parent]
    out.parent.chmod(0o777)                        # a folder anyone may write in: never loaded from
    with pytest.raises(RuntimeError, match="no writable folder.*XDG_CACHE_HOME"):
        native.build()


def test_replicas_sharing_a_cache_build_under_unique_names_and_clear_only_stale_leftovers(monkeypatch, tmp_path):
    """Replicas in containers share a cache volume and often a pid (1): each build's partial file
    was named by the pid alone, and the first to finish removed only older libraries, leaving
    what a killed build wrote forever. Partial files are unique; one older than STALE_BUILD_S
    (a killed build's) and an older source's library are cleared, a younger one (a build in
    progress elsewhere) is left."""
    calls = _fake_compiler(monkeypatch)
    folder = tmp_path / "build"
    folder.mkdir()
    monkeypatch.setattr(native, "BUILD", folder)
    old_lib = folder / "libagp_native-000000000000.so"
    killed = folder / "libagp_native-000000000000.tmp1"
    running = folder / "libagp_native-000000000000.tmp1-abcd"
    for f in (old_lib, killed, running):
        f.write_bytes(b"x")
    stale = time.time() - native.STALE_BUILD_S - 60
    os.utime(killed, (stale, stale))
    out = native.build(force=True)
    native.build(force=True)
    assert calls[0][-1] != calls[1][-1] and all(f"{os.getpid()}-" in c[-1] for c in calls)
    assert sorted(p.name for p in folder.glob("libagp_native-*")) == sorted([out.name, running.name])


def test_replicas_starting_together_compile_the_shared_library_once(monkeypatch, tmp_path):
    """Replicas started at once on a shared cache each compiled the library (~30 s of a core
    each, side by side): one builds it, the others wait on the folder's lock and load it."""
    import threading

    calls = _fake_compiler(monkeypatch, seconds=0.5)
    monkeypatch.setattr(native, "BUILD", tmp_path / "build")
    got = []
    replicas = [threading.Thread(target=lambda: got.append(native.build())) for _ in range(3)]
    for t in replicas:
        t.start()
    for t in replicas:
        t.join(30)
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1 and got[0].exists()


def test_a_container_with_no_writable_temporary_folder_still_loads_the_built_library(monkeypatch, tmp_path):
    """A wholly read-only container (no TMPDIR, /tmp read-only): looking for the temporary
    folder's build raised "No usable temporary directory", and the library built into the
    image was not loaded either."""
    import tempfile

    calls = _fake_compiler(monkeypatch)
    monkeypatch.setattr(native, "BUILD", tmp_path / "build")
    built = native.build()

    def none():
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", none)
    assert native.build() == built and len(calls) == 1


def test_the_library_name_follows_the_cpus_instruction_sets(tmp_path):
    """A folder shared by machines of different CPUs (an image baked on an AVX-512 runner, an NFS
    home) held one library for all of them: the name hashed `-march=native` as written. It
    hashes the instruction sets that compiles for too."""
    avx2 = native.library_path("g++", tmp_path, isa=("fma", "avx2"))
    assert avx2 == native.library_path("g++", tmp_path, isa=("avx2", "fma"))
    assert avx2 != native.library_path("g++", tmp_path, isa=("avx2", "fma", "avx512f", "avx512bw",
                                                             "avx512vl", "avx512dq"))
    assert avx2 != native.library_path("g++", tmp_path, isa=("avx2", "fma", "avx_vnni"))
    assert native.library_path("g++", tmp_path) == native.library_path("g++", tmp_path, isa=native.target_isa())


def test_a_library_built_for_another_cpu_is_refused_before_any_kernel_runs(tmp_path):
    """A library compiled for a CPU with more instruction sets than this one (here: -march of an
    AVX-512 server), found where load() looks under the name this machine would build, stopped
    the process with SIGILL at the first kernel. load() asks the library what it was compiled for
    (agp_isa()) and refuses it with a warning naming what this CPU lacks: the eager path runs."""
    import subprocess
    import sys

    flags = native.cpu_flags()
    foreign = ("icelake-server" if "avx512f" not in flags else
               "sapphirerapids" if "avx512_bf16" not in flags else None)
    if foreign is None or native.compiler() is None or not native.cpu_supported():
        pytest.skip("no compiler, or no instruction set foreign to this CPU to build for")
    (tmp_path / "image").write_text("a file: build/ cannot be made under it")
    script = f"""
import warnings
from pathlib import Path
import torch
from pipeline_dsl.engine import native
from pipeline_dsl.engine.quant import Q8Linear
native.BUILD = Path({str(tmp_path / "image" / "build")!r})
mine = native.FLAGS
# unoptimised (-O0: a few seconds, not -O3's dozen of a core): the instruction sets it is built for
# (agp_isa()) follow -march alone, and no kernel of it may run here anyway
native.FLAGS = [{{"-march=native": "-march={foreign}", "-O3": "-O0"}}.get(f, f) for f in mine]
assert "-O0" in native.FLAGS and "-march={foreign}" in native.FLAGS
built = native.build()                       # the other machine's library ...
native.FLAGS = mine
here = native.library_path(native.compiler(), built.parent)
built.replace(here)                          # ... where this one looks for its own
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lin = Q8Linear(torch.randn(32, 64), torch.bfloat16)
    y = lin(torch.randn(1, 64, dtype=torch.bfloat16))      # the layer's own call: a kernel, were it loaded
print(native.load() is None, tuple(y.shape))
print("|".join(str(w.message) for w in caught))
"""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), AGP_NATIVE="1",
               PYTHONPATH=os.pathsep.join([str(Path(native.__file__).parents[3]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    eager, warning = r.stdout.strip().splitlines()[-2:]
    assert eager == "True (1, 32)"
    assert "lacks" in warning and "avx512" in warning and "eagerly" in warning and "\n" not in warning


def test_f16c_is_not_required_and_the_warning_names_what_the_cpu_lacks(monkeypatch):
    """The kernels use no F16C instruction; cpu_supported() required it and the warning spoke
    of AVX2 and FMA only. Without F16C they run; without FMA the warning says FMA is missing."""
    monkeypatch.delenv("AGP_NATIVE", raising=False)
    monkeypatch.setattr(native, "_WARNED", set())
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert native.cpu_supported() and native.cpu_missing() == []
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx", "avx2", "f16c"}))
    assert not native.cpu_supported() and native.cpu_missing() == ["fma"]
    native.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.load() is None
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "lacks fma" in msgs[0] and "f16c" not in msgs[0]
    finally:
        native.reset()


def test_the_cpu_flags_are_read_once_per_process(monkeypatch):
    """cpu_supported(), int8_dot_products() and activation_parts() (once per linear as a model
    loads) each read /proc/cpuinfo again."""
    reads = []
    real = Path.read_text

    def read_text(self, *a, **kw):
        if str(self) == "/proc/cpuinfo":
            reads.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    native.cpu_flags.cache_clear()
    try:
        for _ in range(5):
            native.cpu_supported(), native.int8_dot_products(), native.activation_parts(), native.fast_bf16()
        assert len(reads) <= 1
    finally:
        native.cpu_flags.cache_clear()
