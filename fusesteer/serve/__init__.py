"""`fusesteer serve`: an OpenAI-compatible HTTP server with per-request steering and continuous batching.

Modules: ``app`` (HTTP routes, SSE), ``protocol`` (request parsing, response shapes), ``engine`` (continuous
batching scheduler), ``steer`` (the steering runtime as the engine uses it), ``registry`` (named plans,
per-request steering specs), ``metrics`` (Prometheus text), ``server`` (wiring, uvicorn).
The HTTP parts need the ``serve`` extra (``pip install "fusesteer[serve]"``: fastapi, uvicorn).
"""
