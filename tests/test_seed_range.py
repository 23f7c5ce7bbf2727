"""A seed is a signed 64-bit integer, -2**63 .. 2**63-1, as vLLM and OpenAI take it: the same
range in a .agp file, an `agp run` request line, an `agp serve` body (and its OpenAPI schema) and
`serve --seed`, each refusing what lies outside with a message naming `seed` and the range.
(torch's manual_seed also takes 2**63 .. 2**64-1, but those are the negative seeds again.)"""
from __future__ import annotations

import json
import textwrap

import pytest

import pipeline_dsl
from pipeline_dsl.engine.config import EngineConfig
from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.engine.sampler import make_generator
from pipeline_dsl.requests_io import RequestError, parse_line
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve.openapi import SAMPLING

LOW, HIGH = -(1 << 63), (1 << 63) - 1
RANGE = f"from {LOW} to {HIGH}"


def _check(seed) -> list:
    text = textwrap.dedent(f"""\
        pipeline p {{
            stage request : requests {{}}
            stage batch   : dynamic_batch {{}}
            stage encode  : encode {{}}
            stage kv      : kv_lookup {{}}
            stage gen     : generate {{ seed = {seed} }}
            stage out     : respond {{}}
            request -> batch
            batch -> encode when full
            batch -> encode when timeout
            encode -> kv -> gen -> out
        }}
        """)
    return pipeline_dsl.loads(text, "t.agp")[1]


def test_a_pipeline_takes_a_seed_at_both_ends_of_the_signed_64_bit_range():
    assert _check(LOW) == [] and _check(HIGH) == []


def test_a_pipeline_seed_past_the_signed_64_bit_range_is_a_positioned_error():
    diags = _check(HIGH + 1)
    assert len(diags) == 1 and diags[0].is_error
    d = diags[0]
    assert (d.pos.line, d.pos.col) == (6, 39)              # at the value
    assert "'seed'" in d.message and d.expected == f"an integer {RANGE}"


@pytest.mark.parametrize("seed", [HIGH + 1, (1 << 64) - 1, LOW - 1])
def test_a_request_line_or_body_with_a_seed_out_of_range_is_refused_naming_it(seed):
    with pytest.raises(RequestError, match=f"'seed' must be an integer {RANGE}"):
        parse_line(json.dumps({"prompt": "hi", "seed": seed}), 1)
    with pytest.raises(P.APIError, match=f"'seed' must be an integer {RANGE}") as err:
        P.parse_chat({"messages": [{"role": "user", "content": "hi"}], "seed": seed},
                     max_model_len=512, served=("tiny",), stages=("gen",))
    assert err.value.param == "seed"


def test_a_request_takes_the_ends_of_the_range_and_the_engine_seeds_from_them():
    for seed in (LOW, HIGH):
        assert parse_line(json.dumps({"prompt": "hi", "seed": seed}), 1).sampling["seed"] == seed
        assert make_generator(seed) is not None


def test_serve_seed_goes_through_the_same_range():
    assert EngineConfig(seed=HIGH).seed == HIGH
    with pytest.raises(InputError, match=f"'seed' must be an integer {RANGE}"):
        EngineConfig(seed=HIGH + 1)


def test_the_openapi_schema_shows_the_range():
    assert SAMPLING["seed"] == {"type": "integer", "minimum": LOW, "maximum": HIGH}
