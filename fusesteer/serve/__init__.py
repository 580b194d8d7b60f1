"""`fusesteer serve`: an OpenAI-compatible HTTP server with per-request steering and continuous batching.

Modules: ``app`` (HTTP routes, SSE), ``protocol`` (request parsing, response shapes), ``engine`` (the continuous
batching loop), ``requests`` (the engine's request, its status and batch row), ``scheduler`` (the admission
policy: pure functions), ``kv`` (the running batch's KV cache: merge, keep rows), ``sampling`` (per-row
sampling), ``steer`` (the steering runtime as the engine uses it), ``registry`` (named plans, per-request
steering specs), ``metrics`` (Prometheus metrics via prometheus_client), ``server`` (wiring, uvicorn).
The HTTP parts need the ``serve`` extra (``pip install "fusesteer[serve]"``: fastapi, uvicorn, prometheus_client).
"""
