"""bench/roofline.py: what it cannot measure on this CPU it says at once, and measures the rest."""
from pathlib import Path

import pytest

from pipeline_dsl.engine import native

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi2".split())
BF16_SKIPPED = {"gemm_bf16_GFLOPs", "gemm_bf16_model_shape_GFLOPs"}


class Stop(Exception):
    pass


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import roofline
    return roofline


def test_a_cpu_without_onednns_bf16_skips_the_bf16_ceilings_saying_why(roofline, monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY)
    skip = roofline.skipped_ceilings()
    assert set(skip) == BF16_SKIPPED
    assert all("AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT" in why and "avx2" in why for why in skip.values())
    assert "PackedLinear" in skip["gemm_bf16_model_shape_GFLOPs"]


def test_a_cpu_with_avx512_measures_the_bf16_gemm(roofline, monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"})
    assert "gemm_bf16_GFLOPs" not in roofline.skipped_ceilings()   # the packing: as the tiny try here finds it


def test_the_skips_are_printed_before_measuring_and_the_other_ceilings_measured(roofline, monkeypatch, capsys):
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX2_ONLY)

    def no_model(*args, **kwargs):
        raise Stop                  # the ceilings are done: the model's steps are not this test's
    monkeypatch.setattr(roofline, "load_weights", no_model)
    with pytest.raises(Stop):
        roofline.main(["--threads", "1", "--batches", "1", "--weights", "int4"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines[:2]] == sorted(BF16_SKIPPED)
    assert all(" skipped: oneDNN's bf16 needs AVX-512" in ln for ln in lines[:2])
    ceil = lines[2]
    assert ceil.startswith("ceilings (1 threads): memory read ")
    assert "GEMM bf16 skipped (this model's gate_up at 32 rows: skipped), fp32 " in ceil


@pytest.mark.parametrize("argv, message", [
    (["--batches", "1,x"], "--batches: 'x' is not a whole number"),
    (["--batches", "0"], "--batches: '0': at least 1"),
    (["--weights", "bf16,int8"], "--weights: 'int8': expected bf16 or int4"),
    (["--threads", "two"], "--threads: 'two' is not a whole number"),
])
def test_bad_options_exit_2_before_anything_is_measured(roofline, monkeypatch, capsys, argv, message):
    def measured(*args, **kwargs):
        raise AssertionError("measured before the options were checked")
    monkeypatch.setattr(roofline, "ceilings", measured)
    with pytest.raises(SystemExit) as e:
        roofline.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    from tiny_model import write_tiny_gguf

    from pipeline_dsl.engine.gguf_loader import load_gguf
    return load_gguf(write_tiny_gguf(tmp_path_factory.mktemp("q4") / "q4.gguf", qtype="Q4_1"))


def native_off(monkeypatch):
    monkeypatch.setenv("AGP_NATIVE", "0")
    native.reset()


@pytest.fixture
def fresh_native():
    native.reset()
    yield
    native.reset()


@pytest.mark.parametrize("cpu", ["int8 kernels, bf16 emulated", "bf16 in hardware", "no native library"])
def test_the_path_column_names_what_computes_a_large_batch(roofline, q4, monkeypatch, fresh_native, cpu):
    """Past the native step's rows the layers' GEMMs are agp's int8 kernels where bf16 is emulated
    (AVX2, AVX-512 VNNI without AMX), a bf16 copy's GEMMs with bf16 in hardware, and torch's own
    without the native library; at most native_max_batch rows the native step."""
    if cpu == "no native library":
        native_off(monkeypatch)
    elif native.load() is None or not native.int8_dot_products():
        pytest.skip("agp's int8 kernels do not run here")
    monkeypatch.setattr(native, "fast_bf16", lambda: cpu == "bf16 in hardware")
    path = roofline.Case(q4.config, q4.weights, "int4", 12, prompt=20).path()
    if cpu == "int8 kernels, bf16 emulated":
        assert path.startswith("agp's int8 kernels (") and path.endswith(") + native glue"), path
    elif cpu == "bf16 in hardware":
        assert "bfloat16 GEMMs" in path and "emulated" not in path and path.endswith(" + native glue"), path
    else:
        assert path.startswith("eager: ") and "agp's" not in path, path
        return
    assert roofline.Case(q4.config, q4.weights, "int4", 2, prompt=20).path() == "native step"


def test_the_gemm_column_of_the_native_step_times_its_own_kernels(roofline, q4, monkeypatch, fresh_native):
    """In the native step a dense bf16 layer runs agp's kernel on its bf16 records (float32 out),
    not torch's bf16 GEMM (emulated without bf16 in hardware); a larger batch's layers are their
    own calls, as the glued step makes them."""
    if native.load() is None:
        pytest.skip("no native library here")
    import torch

    small = roofline.Case(q4.config, q4.weights, "bf16", 2, prompt=20)
    assert small.path() == "native step"
    assert all(y.dtype == torch.float32 for y in small.gemm_only()())
    large = roofline.Case(q4.config, q4.weights, "bf16", 12, prompt=20)
    assert all(y.dtype == torch.bfloat16 for y in large.gemm_only()()[:-1])     # the head: Q8's own
