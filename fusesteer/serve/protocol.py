"""OpenAI request parsing and validation, incremental detokenization with stop strings, response shapes."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP = 4
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered as OpenAI's {"error": {...}} body with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes, over the {MAX_BODY_BYTES} byte limit",
                       code="body_too_large")
    try:
        # NaN / Infinity are parsed (Python's json accepts them) so that they get a specific message later
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number, got {v!r}", param=name)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be a finite number in {rng}, got {body.get(name)!r}", param=name)
    return v


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise bad(f"'{name}' must be an integer, got {v!r}", param=name)
    return v


@dataclass
class GenParams:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool = False
    steering: Any = None


def parse_common(body: dict, limit_tokens: int, chat: bool) -> GenParams:
    mt = _int(body, "max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else _int(body, "max_tokens")
    pname = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if mt is not None and mt < 1:
        raise bad(f"'{pname}' must be at least 1, got {mt}", param=pname)
    if mt is not None and mt > limit_tokens:
        raise bad(f"'{pname}' is {mt}, over this server's limit of {limit_tokens} tokens (--max-tokens)",
                  param=pname, code="max_tokens_over_limit")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1 (got {n}); send one request per completion", param="n")
    for name in ("echo", "logprobs", "top_logprobs", "best_of", "tools", "functions", "suffix"):
        v = body.get(name)
        if not v or (name == "best_of" and v == 1):
            continue
        raise bad(f"'{name}' is not supported by this server", param=name)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"'stop' takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                  param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", param="stream_options")
    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool):
        raise bad("'return_token_ids' must be true or false", param="return_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be true or false", param="ignore_eos")
    seed = _int(body, "seed")
    return GenParams(
        max_tokens=mt,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=None if seed is None else seed % (2 ** 63),
        stop=stops, stream=stream, include_usage=bool(so.get("include_usage", False)),
        return_token_ids=rti, ignore_eos=ignore_eos, steering=body.get("steering"))


def parse_prompt(body: dict, vocab_size: int) -> tuple[str | None, list[int] | None]:
    """(text, None) or (None, token ids) from a completions body."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' is empty", param="prompt")
        return p, None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad_ids = [t for t in p if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad(f"'prompt' holds token id {bad_ids[0]} outside the vocabulary (0..{vocab_size - 1})",
                      param="prompt")
        return None, list(p)
    if isinstance(p, list) and len(p) > 1:
        raise bad("'prompt' holds several prompts; send one request per prompt", param="prompt")
    raise bad("'prompt' must be a non-empty string or a list of token ids", param="prompt")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}", param=f"{where}.role")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}",
                              param=f"{where}.content")
                parts.append(part["text"])
            c = "".join(parts)
        if not isinstance(c, str):
            raise bad(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": c})
    return out


class TextStream:
    """Incremental detokenization: ``push(token)`` returns the new text that is safe to send (held back while a
    UTF-8 character or a stop string may still be incomplete); ``stopped`` once a stop string appeared."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stops:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final:
            while end > self.sent and self.text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
                end -= 1
            end = max(self.sent, end - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def flush(self) -> str:
        return self._advance(final=True)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Shape:
    """Builds OpenAI response objects for one request."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}

    def full(self, text: str, finish: str, usage: dict, token_ids: list[int] | None) -> dict:
        if self.chat:
            choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage}


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
