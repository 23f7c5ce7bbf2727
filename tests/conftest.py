"""Shared fixtures. `tiny_gguf`: path of a tiny random Llama GGUF (written once per session)."""

import pytest

from tiny_model import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")
