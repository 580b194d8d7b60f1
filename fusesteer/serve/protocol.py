"""OpenAI request parsing and validation, incremental detokenization with stop strings, response shapes."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .sampling import Sampling

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
SHOW_CHARS = 80


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


def show(v: Any) -> str:
    """A client's value for an error message: its repr, cut to SHOW_CHARS (a value may be megabytes, or an
    integer of thousands of digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 30:
        return f"an integer of {len(str(abs(v)))} digits"
    try:
        r = repr(v)
    except (RecursionError, ValueError):
        return f"a {type(v).__name__}"
    return r if len(r) <= SHOW_CHARS else r[:SHOW_CHARS - 3] + "..."


def parse_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes, over the {MAX_BODY_BYTES} byte limit",
                       code="body_too_large")
    try:
        # NaN / Infinity are parsed (Python's json accepts them) so that they get a specific message later
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise bad("request body is not valid JSON for this server: nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number, got {show(v)}", param=name)
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        f = math.inf
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{name}' must be a finite number in {rng}, got {show(v)}", param=name)
    return f


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise bad(f"'{name}' must be an integer, got {show(v)}", param=name)
    return v


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{where or name}' must be true or false, got {show(v)}", param=where or name)
    return v


# Every request field is one of: read by this server (both endpoints, or one), or an OpenAI field this server does
# not implement, accepted only with a value that asks for nothing (null or the listed defaults) and otherwise
# refused with 400 naming it. Anything else is refused as unknown: no field is silently ignored.
FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
          "frequency_penalty", "presence_penalty", "logit_bias",
          "user", "safety_identifier", "prompt_cache_key",  # identify the caller / hint a cache: no effect on output
          "top_k", "min_tokens", "repetition_penalty", "ignore_eos", "return_token_ids", "steering"}  # extensions
FIELDS_OF = {"completions": {"prompt"}, "chat": {"messages", "max_completion_tokens"}}
UNSUPPORTED = {
    "completions": {"echo": (False,), "best_of": (1,), "suffix": ("",), "logprobs": ()},
    "chat": {"logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
             "parallel_tool_calls": (True,), "functions": ([],), "function_call": ("none",),
             "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
             "reasoning_effort": (), "verbosity": (), "web_search_options": (), "store": (False,), "metadata": ({},),
             "service_tier": ("auto", "default")},
}
STREAM_OPTIONS = {"include_usage"}


def check_fields(body: dict, endpoint: str) -> None:
    known = FIELDS | FIELDS_OF[endpoint]
    unsupported = UNSUPPORTED[endpoint]
    for name, v in body.items():
        if name in known:
            continue
        if name in unsupported:
            if v is None or any(type(v) is type(d) and v == d for d in unsupported[name]):
                continue
            ok = " or ".join(["null"] + [json.dumps(d) for d in unsupported[name]])
            raise bad(f"'{name}' is not supported by this server (accepted only as {ok}); got {show(v)}",
                      param=name, code="unsupported_field")
        other = next((e for e, f in FIELDS_OF.items() if name in f or name in UNSUPPORTED[e]), None)
        where = f"is a field of /v1/{'chat/completions' if other == 'chat' else 'completions'}, not of this " \
                "endpoint" if other else "is not a field this server knows"
        raise bad(f"{show(name)} {where}; the server refuses fields it would otherwise ignore", param=str(name)[:64],
                  code="unknown_field")


@dataclass
class GenParams:
    max_tokens: int | None
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool = False
    steering: Any = None


def _logit_bias(body: dict, vocab_size: int) -> tuple:
    lb = body.get("logit_bias")
    if lb is None:
        return ()
    if not isinstance(lb, dict):
        raise bad(f"'logit_bias' must be an object mapping token ids to numbers, got {show(lb)}", param="logit_bias")
    if len(lb) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' has {len(lb)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    out = []
    for k, v in lb.items():
        t = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 12 else -1
        if not 0 <= t < vocab_size:
            raise bad(f"'logit_bias' key {show(k)} is not a token id in 0..{vocab_size - 1}", param="logit_bias")
        out.append((t, _number({"logit_bias": v}, "logit_bias", 0.0, -100.0, 100.0)))
    return tuple(out)


def parse_common(body: dict, limit_tokens: int, chat: bool, vocab_size: int) -> GenParams:
    check_fields(body, "chat" if chat else "completions")
    pname = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    mt = _int(body, pname)
    if mt is not None and mt < 1:
        raise bad(f"'{pname}' must be at least 1, got {show(mt)}", param=pname)
    if mt is not None and mt > limit_tokens:
        raise bad(f"'{pname}' is {show(mt)}, over this server's limit of {limit_tokens} tokens (--max-tokens)",
                  param=pname, code="max_tokens_over_limit")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1 (got {show(n)}); send one request per completion", param="n")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad(f"'stop' must be a string or a list of strings, got {show(stop)}", param="stop")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"'stop' takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                  param="stop")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad(f"'stream_options' must be an object, got {show(so)}", param="stream_options")
    if set(so) - STREAM_OPTIONS:
        raise bad(f"'stream_options' takes only {sorted(STREAM_OPTIONS)}, got {show(sorted(map(str, so)))}",
                  param="stream_options")
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad(f"'{name}' must be a string, got {show(body[name])}", param=name)
    seed = _int(body, "seed")
    top_k = _int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise bad(f"'top_k' must be -1 or 0 (off) or a positive integer, got {show(top_k)}", param="top_k")
    min_tokens = _int(body, "min_tokens")
    if min_tokens is not None and not 0 <= min_tokens <= limit_tokens:
        raise bad(f"'min_tokens' must be an integer in [0, {limit_tokens}], got {show(min_tokens)}", param="min_tokens")
    sampling = Sampling(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(0, min(top_k or 0, vocab_size)),
        seed=None if seed is None else seed % (2 ** 63),
        min_tokens=min_tokens or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, vocab_size))
    return GenParams(
        max_tokens=mt, sampling=sampling, stop=stops, stream=_flag(body, "stream"),
        include_usage=_flag(so, "include_usage", "stream_options.include_usage"),
        return_token_ids=_flag(body, "return_token_ids"), ignore_eos=_flag(body, "ignore_eos"),
        steering=body.get("steering"))


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
            raise bad(f"'prompt' holds token id {show(bad_ids[0])} outside the vocabulary (0..{vocab_size - 1})",
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
            raise bad(f"{where}.role must be 'system', 'user' or 'assistant', got {show(role)}",
                      param=f"{where}.role")
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
    UTF-8 character or a stop string may still be incomplete); ``stopped`` once a stop string appeared.
    Stop strings count from the ``min_tokens``-th token on (as end-of-sequence does)."""

    def __init__(self, tokenizer, stops: list[str], min_tokens: int = 0):
        self.tok = tokenizer
        self.stops = stops
        self.min_tokens = min_tokens
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
        if self.stops and len(self.ids) >= self.min_tokens:
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
