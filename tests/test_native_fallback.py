"""Without a C++ compiler (or AVX-512) the native kernels are not built: one warning line,
and the runner runs its eager path."""

import warnings

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


def test_the_library_name_follows_the_source(monkeypatch, tmp_path):
    src = tmp_path / "kernels.cpp"
    src.write_text("int x;")
    monkeypatch.setattr(native, "SOURCE", src)
    a = native.library_path("g++")
    src.write_text("int y;")
    assert native.library_path("g++") != a                 # a changed source is rebuilt, never reused
