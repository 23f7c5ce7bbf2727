"""Sampler behaviour that `make mutate` found untested (docs/testing.md).

Kept apart from tests/test_sampler.py so that the sampling work (penalties, min_p, logit_bias,
logprobs, constrained-decoding masks) merges cleanly; after that merge, run
`make mutate FILES=pipeline_dsl/engine/sampler.py` again."""
