"""`agp serve`: the pipeline's engine behind an OpenAI-compatible HTTP API.

`protocol` validates requests and builds response bodies, `async_engine` drives the
engine from one background thread for asyncio callers, `metrics` holds the Prometheus
metrics and `app` the FastAPI routes. The command itself is `pipeline_dsl.commands.serve`.
"""
