"""`agp serve`: the pipeline behind an OpenAI-compatible HTTP API.

`protocol` validates requests and builds response bodies, `async_pipeline` connects the
pipeline runtime's threads to asyncio callers, `metrics` holds the Prometheus metrics and
`app` the FastAPI routes. The command itself is `pipeline_dsl.commands.serve`.
"""
