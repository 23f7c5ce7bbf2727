"""Shared fixtures. `tiny_gguf`: path of a tiny random Llama GGUF (written once per session)."""

import pytest
import torch

from tiny_model import write_tiny_gguf


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
