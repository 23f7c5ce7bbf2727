"""`agp serve`: the pipeline behind an OpenAI-compatible HTTP API.

`options` holds the flags (shared with Ray replicas), `build` makes the runtime, metrics and
app for them; `app` assembles the FastAPI application from `routes` (a module-level router),
the serving objects `generation` (completions, chat; streamed by `sse`), `responses` (the
Responses API; streamed by `responses_events`), `embeddings` and `scores` (vLLM's score and
rerank, on the embeddings path), with the middleware `access`
(request id, root path, access log) and `guard` (API key, Host, connection limit). `protocol`
and `extras` validate bodies (an `api_error.APIError` for what they refuse), `errors` maps
failures to answers, `async_pipeline` connects the runtime's threads to asyncio, `metrics`
exports Prometheus series, `server` runs uvicorn, and `ray`, `ray_deployments` and
`ray_metrics` run it on Ray Serve. The command itself is `pipeline_dsl.commands.serve`.
"""
