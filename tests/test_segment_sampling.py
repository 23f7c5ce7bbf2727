"""A request's SamplingParams at its generate stage (EngineSegment.sampling): without its own
max_tokens an answer gets at most the room its context leaves; a tool-call marker's text is kept
(keep_special) unless the request sets skip_special_tokens itself."""
from __future__ import annotations

import pytest

from pipeline_dsl.flow import build_runtime
from test_bad_words import STAGE_PIPELINE     # its generate stage: max_new_tokens = 4 and {gen}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def segment(tmp_path, tiny_gguf):
    path = tmp_path / "p.agp"
    path.write_text(STAGE_PIPELINE.format(model=tiny_gguf, gen=""))
    rt = build_runtime(str(path), overrides={"threads": 1})
    try:
        yield rt.segments[0]
    finally:
        rt.close()


def test_an_answer_without_its_own_max_tokens_gets_at_most_the_room_its_context_leaves(segment):
    longest = segment.max_model_len

    def max_tokens(prompt_len, **data):
        return segment.sampling("gen", {"prompt": "hi", **data}, prompt_len).max_tokens

    assert max_tokens(3) == 4                                 # the stage's max_new_tokens
    assert max_tokens(longest - 4) == 4                       # room for all of them
    assert max_tokens(longest - 3) == 3                       # one less: the room
    assert max_tokens(longest - 1) == 1
    assert max_tokens(longest - 3, max_tokens=4) == 4         # the request's own is kept as it is


def test_a_request_s_own_skip_special_tokens_wins_over_keeping_a_marker(segment):
    def skips(keep_special, **data):
        return segment.sampling("gen", {"prompt": "hi", **data}, 3, keep_special=keep_special).skip_special_tokens

    assert skips(False) is True                               # vLLM's default
    assert skips(True) is False                               # a tool-call marker's text stays in the answer
    assert skips(True, skip_special_tokens=True) is True      # ... unless the request says otherwise
    assert skips(False, skip_special_tokens=False) is False
