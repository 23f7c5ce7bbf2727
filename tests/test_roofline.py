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
