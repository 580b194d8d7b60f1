"""The HTTP layer: an OpenAI-compatible FastAPI app over one :class:`~fusesteer.serve.engine.Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with ``stream: true`` as server-sent events in
OpenAI's chunk format), GET /v1/models, GET/POST/DELETE /v1/steering/plans, GET /health, GET /metrics.
Every error is OpenAI's ``{"error": {...}}`` body with a specific message; nothing a client sends can stop
the server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PlanError
from .engine import Engine, EngineStopped, QueueFull
from .metrics import Metrics
from .protocol import (
    MAX_BODY_BYTES,
    SSE_DONE,
    APIError,
    GenParams,
    Shape,
    TextStream,
    bad,
    parse_common,
    parse_json,
    parse_messages,
    parse_prompt,
    show,
    sse,
)
from .registry import PlanRegistry, PlanTooLarge, Steering, SteeringSpecError, effective_plan, parse_steering
from .requests import GenRequest

log = logging.getLogger("fusesteer.serve")

DISCONNECT_POLL_S = 0.2


@dataclass
class ServerConfig:
    model_name: str
    max_tokens: int = 512  # per-request limit on max_tokens
    max_model_len: int = 2048  # prompt + completion
    api_key: str | None = None
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions
    world_size: int = 1  # processes running the model (tensor parallelism); rank 0 serves


class _ClientGone(Exception):
    pass


@dataclass
class _Poll:
    """When this response last asked whether its client is still there."""

    checked_at: float = 0.0


def max_token_chars(tok) -> int:
    """The most characters one token can stand for: the longest string in the vocabulary (a byte-level BPE
    piece has one character per byte, so it is never shorter than the text it encodes), at least 1."""
    try:
        return max(1, max((len(t) for t in tok.get_vocab()), default=1))
    except (AttributeError, TypeError, NotImplementedError):
        return 64


async def read_capped(request: Request, cap: int, what: str, code: str) -> bytes:
    """The request body, read as it arrives and refused with 413 as soon as it passes ``cap`` bytes (a body
    over the cap is never held in memory)."""
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > cap:
        raise APIError(413, f"{what} is {show(int(cl))} bytes, over the server's {cap} byte limit", code=code)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > cap:
            raise APIError(413, f"{what} is over the server's {cap} byte limit", code=code)
    return bytes(buf)


def _eos_ids(model, tok) -> frozenset:
    ids = set()
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    for v in (e if isinstance(e, (list, tuple)) else [e]):
        if isinstance(v, int):
            ids.add(v)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return frozenset(ids)


def create_app(engine: Engine, registry: PlanRegistry, tokenizer, config: ServerConfig,
               metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or engine.metrics
    app = FastAPI(title="fusesteer serve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    eos = _eos_ids(engine.model, tokenizer)
    vocab = int(getattr(engine.model.config, "vocab_size", 0) or len(tokenizer))
    # a prompt text longer than this many characters cannot fit the context whatever it encodes to: refused
    # before the tokenizer runs (see the README's "Limits")
    max_prompt_chars = config.max_model_len * max_token_chars(tokenizer)
    started = int(time.time())
    # request parsing, tokenization and chat templates run here, one at a time, never on the event loop
    work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusesteer-parse")
    app.state.engine, app.state.registry, app.state.config, app.state.work = engine, registry, config, work

    # ---- errors ----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse(bad(f"invalid request: {exc.errors()}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), type_="invalid_request_error",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def check_auth(request: Request) -> None:
        if not config.api_key:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if not h:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           type_="authentication_error", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "incorrect API key", type_="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise bad(f"'model' must be a string, got {show(m)}", param="model")
        if m is not None and m != config.model_name:
            raise APIError(404, f"model {show(m)} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    # ---- generation ------------------------------------------------------------------------------
    def too_long(chars: int, param: str) -> APIError:
        return bad(f"the prompt is {chars} characters; this model's maximum context length is {config.max_model_len} "
                   f"tokens, which no text over {max_prompt_chars} characters fits", param=param,
                   code="context_length_exceeded")

    def build_request(raw: bytes, chat: bool, endpoint: str, sink) -> tuple[GenRequest, GenParams]:
        """Parse, validate and tokenize a request body (on the worker thread)."""
        body = parse_json(raw)
        check_model(body)
        params = parse_common(body, config.max_tokens, chat, vocab)
        if chat:
            msgs = parse_messages(body)
            if not getattr(tokenizer, "chat_template", None):
                raise bad("this model's tokenizer has no chat template; use /v1/completions", param="messages")
            chars = sum(len(m["content"]) for m in msgs)
            if chars > max_prompt_chars:
                raise too_long(chars, "messages")
            if len(msgs) > config.max_model_len:  # a chat template spends at least one token on each message
                raise bad(f"'messages' holds {len(msgs)} messages; this model's maximum context length is "
                          f"{config.max_model_len} tokens", param="messages", code="context_length_exceeded")
            enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
            ids = list(enc["input_ids"])
        else:
            text, ids = parse_prompt(body, vocab)
            if text is not None:
                if len(text) > max_prompt_chars:
                    raise too_long(len(text), "prompt")
                ids = tokenizer(text)["input_ids"]
                if not ids:
                    raise bad("'prompt' encodes to zero tokens", param="prompt")
        room = config.max_model_len - len(ids)
        if room < 1:
            raise bad(f"the prompt is {len(ids)} tokens; this model's maximum context length is "
                      f"{config.max_model_len} tokens", param="messages" if chat else "prompt",
                      code="context_length_exceeded")
        if params.max_tokens is None:
            want = config.max_tokens if chat else config.default_completion_tokens
            params.max_tokens = max(1, min(want, room, config.max_tokens))
        elif params.max_tokens > room:
            raise bad(f"this model's maximum context length is {config.max_model_len} tokens; the request asks "
                      f"for {len(ids) + params.max_tokens} ({len(ids)} in the prompt, {params.max_tokens} to "
                      "generate)", param="max_tokens", code="context_length_exceeded")
        if params.sampling.min_tokens > params.max_tokens:
            raise bad(f"'min_tokens' ({params.sampling.min_tokens}) is more than the {params.max_tokens} tokens the "
                      "request may generate", param="min_tokens")
        try:
            steering = parse_steering(params.steering, registry)
            # composing and scaling plans is work for this thread, not for the engine's (which every stream waits on)
            plan = None if steering.key is None or engine.steerer.has(steering.key) else effective_plan(steering)
        except SteeringSpecError as e:
            raise bad(str(e), param=e.param, code=e.code) from None
        except PlanError as e:
            raise bad(f"steering {steering.label!r} cannot be applied: {e}", param="steering",
                      code="invalid_steering") from None
        req = GenRequest(prompt_ids=ids, max_tokens=params.max_tokens, sink=sink, steering=steering,
                         sampling=params.sampling, eos_ids=frozenset() if params.ignore_eos else eos,
                         endpoint=endpoint, plan=plan)
        return req, params

    async def _next(q: asyncio.Queue, request: Request, poll: _Poll):
        """Next engine event; raises _ClientGone if the client went away (checked at least every
        DISCONNECT_POLL_S, also while events keep coming)."""
        now = time.monotonic()
        if now - poll.checked_at >= DISCONNECT_POLL_S:
            poll.checked_at = now
            if await request.is_disconnected():
                raise _ClientGone()
        get = asyncio.ensure_future(q.get())
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
                if done:
                    return get.result()
                poll.checked_at = time.monotonic()
                if await request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not get.done():
                get.cancel()

    def _error_from_event(ev) -> APIError:
        _, status, message, code = ev
        return APIError(status, message, type_="invalid_request_error" if status < 500 else "server_error",
                        code=code)

    async def generate(request: Request, chat: bool):
        check_auth(request)
        endpoint = "chat" if chat else "completions"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev, _loop=loop, _q=q):
            _loop.call_soon_threadsafe(_q.put_nowait, ev)

        try:
            raw = await read_capped(request, MAX_BODY_BYTES, "request body", "body_too_large")
            req, params = await loop.run_in_executor(work, build_request, raw, chat, endpoint, sink)
        except APIError as e:
            metrics.count_request(endpoint, "-", f"http_{e.status}")
            raise
        try:
            engine.submit(req)
        except QueueFull as e:
            metrics.count_request(endpoint, req.steering.label, "http_429")
            raise APIError(429, f"the server's {engine.max_batch} rows are busy and {engine.max_queue} requests wait "
                           f"(--max-queue); retry in {math.ceil(e.retry_after)} s", type_="rate_limit_error",
                           code="queue_full",
                           headers={"Retry-After": str(math.ceil(e.retry_after))}) from None
        except EngineStopped as e:
            metrics.count_request(endpoint, req.steering.label, "http_503")
            raise APIError(503, str(e), type_="server_error", code="unavailable") from None
        shape = Shape(chat=chat, model=config.model_name)
        poll = _Poll()
        text = TextStream(tokenizer, params.stop, params.sampling.min_tokens)

        def cancel(reason="cancelled"):
            req.cancel(reason)
            engine.wake()

        def gone() -> Response:
            """The client went away: the request is cancelled; one log line, and a response no one reads."""
            cancel()
            log.info("request %s: the client disconnected; cancelled", req.id)
            return Response(status_code=499)

        # wait for the first event before answering, so failures at the prompt get a real status code
        try:
            first = await _next(q, request, poll)
        except _ClientGone:
            return gone()
        except asyncio.CancelledError:
            cancel()
            raise
        if first[0] == "error":
            raise _error_from_event(first)

        def usage():
            n = len(req.generated)
            return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,
                    "total_tokens": len(req.prompt_ids) + n}

        if not params.stream:
            parts, ev, finish = [], first, None
            try:
                while True:
                    if ev[0] == "token":
                        parts.append(text.push(ev[1]))
                        if text.stopped:
                            finish = "stop"
                            cancel("stop")
                            break
                    elif ev[0] == "finish":
                        finish = ev[1]
                        break
                    else:
                        raise _error_from_event(ev)
                    ev = await _next(q, request, poll)
            except _ClientGone:
                return gone()
            except asyncio.CancelledError:
                cancel()
                raise
            parts.append(text.flush())
            ids = list(req.generated) if params.return_token_ids else None
            return JSONResponse(shape.full("".join(parts), finish, usage(), ids))

        async def events():
            ev, opened = first, False
            try:
                while True:
                    if ev[0] == "token":
                        delta = text.push(ev[1])
                        if text.stopped:
                            yield sse(shape.chunk(delta, first=not opened))
                            yield sse(shape.chunk(None, "stop"))
                            cancel("stop")
                            break
                        if delta or not opened:
                            yield sse(shape.chunk(delta, first=not opened))
                            opened = True
                    elif ev[0] == "finish":
                        rest = text.flush()
                        if rest:
                            yield sse(shape.chunk(rest))
                        yield sse(shape.chunk(None, ev[1]))
                        break
                    else:
                        yield sse(_error_from_event(ev).body())
                        break
                    ev = await _next(q, request, poll)
                if params.include_usage:
                    yield sse(shape.usage_chunk(usage()))
                yield SSE_DONE
            except _ClientGone:
                pass
            finally:
                if not req.done:
                    cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    # ---- models, plans, health, metrics ----------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": started,
                                            "owned_by": "fusesteer"}]}

    @app.get("/v1/steering/plans")
    async def list_plans(request: Request):
        check_auth(request)
        return {"object": "list", "data": registry.list()}

    @app.get("/v1/steering/plans/{name}")
    async def get_plan(name: str, request: Request):
        check_auth(request)
        rec = registry.get(name)
        if rec is None:
            raise APIError(404, f"no steering plan named {show(name)}", param="name", code="plan_not_found")
        return rec.describe()

    def add_plan_file(name: str, data: bytes, replace: bool):
        """Parse, check and register an uploaded plan, and compose what the engine will write (a worker thread)."""
        rec = registry.add_bytes(name, data, "upload", replace)
        return rec, effective_plan(Steering(((rec, 1.0),)))

    @app.post("/v1/steering/plans")
    async def upload_plan(request: Request):
        check_auth(request)
        name = request.query_params.get("name") or request.headers.get("x-plan-name")
        if not name:
            raise bad("give the plan's name as ?name=NAME (the body is the plan file: a fusesteer .safetensors or "
                      "a GGUF control vector)", param="name")
        replace = request.query_params.get("replace", "false").lower() in ("1", "true", "yes")
        data = await read_capped(request, registry.max_plan_bytes, "plan file", "plan_too_large")
        try:
            rec, plan = await asyncio.to_thread(add_plan_file, name, data, replace)
        except KeyError:
            raise APIError(409, f"a plan named {name!r} already exists; DELETE it first or pass ?replace=true",
                           param="name", code="plan_exists") from None
        except PlanTooLarge as e:
            raise APIError(413, f"plan {show(name)} rejected: {e}", param="file", code="plan_too_large") from None
        except PlanError as e:
            raise bad(f"plan {show(name)} rejected: {e}", param="file", code="invalid_plan") from None
        metrics.set_gauge("plans_loaded", len(registry))
        engine.preload(Steering(((rec, 1.0),)), plan)  # into a free table slot between two forwards
        return JSONResponse(rec.describe(), status_code=201)

    @app.delete("/v1/steering/plans/{name}")
    async def delete_plan(name: str, request: Request):
        check_auth(request)
        try:
            registry.delete(name)
        except KeyError:
            raise APIError(404, f"no steering plan named {show(name)}", param="name", code="plan_not_found") from None
        metrics.set_gauge("plans_loaded", len(registry))
        return {"id": name, "object": "steering.plan", "deleted": True}

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "error": engine.failure, "world_size": config.world_size},
                                status_code=503)
        return {"status": "ok", "model": config.model_name, "world_size": config.world_size,
                "active_requests": engine.active,
                "queued_requests": engine.queued, "plans": len(registry), "steps": engine.steps}

    @app.get("/metrics")
    async def prom_metrics():
        metrics.set_gauge("plans_loaded", len(registry))
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app

