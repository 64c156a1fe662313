"""OpenAI's request and response shapes for /v1/chat/completions and /v1/completions, and its
error shape. Every field a request gives is checked here (type, range) before anything reaches
the model; a bad one is an `ApiError` naming the field."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from runner.backend import Message
from runner.words import one_line

MAX_STOPS = 4                # OpenAI's limit
MAX_STOP_CHARS = 1000
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """What one request asks for, checked. `messages` for a chat, `prompt` for a plain completion."""

    chat: bool
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    temperature: float = 1.0          # OpenAI's default
    top_p: float = 1.0
    max_tokens: int | None = None     # None: as many as the context leaves room for
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False       # stream_options.include_usage: a last chunk with the usage


def parse_chat(body: dict, served: tuple[str, ...]) -> GenerationRequest:
    check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    parsed = tuple(_message(item, f"messages[{i}]") for i, item in enumerate(messages))
    max_tokens = _field(body, "max_completion_tokens", int, minimum=1)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, minimum=1)
    return GenerationRequest(chat=True, messages=parsed, max_tokens=max_tokens, **_sampling(body))


def parse_completion(body: dict, served: tuple[str, ...]) -> GenerationRequest:
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    _text(prompt, "prompt")
    if not prompt:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    _refuse(body, "echo", "suffix")
    if _field(body, "best_of", int, minimum=1) not in (None, 1):
        raise ApiError(400, "'best_of' must be 1: runner serve answers one choice per request", param="best_of")
    max_tokens = _field(body, "max_tokens", int, minimum=1)
    return GenerationRequest(chat=False, prompt=prompt, max_tokens=16 if max_tokens is None else max_tokens,
                             **_sampling(body))   # 16: the completions API's default, as OpenAI's


def check_model(body: dict, served: tuple[str, ...]) -> None:
    """The model a request names must be the one loaded, `served[0]`, or one of its other names
    (no name: the one loaded)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model not in served:
        raise ApiError(404, f"the model '{model[:200]}' is not served here; this server has {served[0]} "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def _sampling(body: dict) -> dict[str, Any]:
    n = _field(body, "n", int, minimum=1)
    if n not in (None, 1):
        raise ApiError(400, "'n' must be 1: runner serve answers one choice per request", param="n")
    _refuse(body, "logprobs", "top_logprobs", "tools", "functions")
    stream = _field(body, "stream", bool) or False
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = _field(options, "include_usage", bool, label="stream_options.include_usage") or False
    temperature = _field(body, "temperature", float, minimum=0.0, maximum=2.0)
    top_p = _field(body, "top_p", float, maximum=1.0)
    if top_p is not None and top_p <= 0:
        raise ApiError(400, "'top_p' must be more than 0 and at most 1", param="top_p")
    return dict(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stops(body.get("stop")),
        seed=_field(body, "seed", int, minimum=0, maximum=2**63 - 1),
        stream=stream,
        include_usage=include_usage,
    )


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
    role = item.get("role")
    if role not in ROLES:
        raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, not {one_line(str(role), 40)!r}",
                       param=f"{where}.role")
    return Message(ROLES[role], _content(item.get("content"), f"{where}.content"))


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (images and audio are not for this server)."""
    if isinstance(content, str):
        return _text(content, where)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, f"'{where}' parts must be {{\"type\": \"text\", \"text\": ...}}: "
                                    "this server takes text only", param=where)
            texts.append(_text(part["text"], where))
        return "".join(texts)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", param=where)


def _text(text: str, where: str) -> str:
    """`text` if a tokenizer can take it: JSON's escapes "\\ud800" decode to a lone surrogate, which
    no UTF-8 encoder takes (the tokenizer would fail mid-request, a 500 instead of this 400)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ApiError(400, f"'{where}' is not valid Unicode text: a lone surrogate "
                            f"(\\u{ord(text[error.start]):04x}) at character {error.start}", param=where) from None
    return text


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings "
                            f"(each at most {MAX_STOP_CHARS} characters)", param="stop")
    return tuple(stops)


KINDS = {bool: "a boolean", int: "an integer", float: "a number"}


def _field(body: dict, name: str, kind: type, *, minimum: float | None = None, maximum: float | None = None,
           label: str | None = None):
    """body[name] checked to be of `kind` (bool, int or float) and in range; None when absent or null."""
    label = label or name
    value = body.get(name)
    if value is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)   # 16.0 from a client that writes every number as a float
    if kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool):   # bool is an int in Python: JSON's true must not pass for 1
        ok = False
    elif kind is int:
        ok = isinstance(value, int)
    else:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    if not ok:
        raise ApiError(400, f"'{label}' must be {KINDS[kind]}", param=label)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            bounds = f"at least {minimum}"
        elif minimum is None:
            bounds = f"at most {maximum}"
        else:
            bounds = f"between {minimum} and {maximum}"
        raise ApiError(400, f"'{label}' must be {bounds}, not {value}", param=label)
    return float(value) if kind is float else value


def _refuse(body: dict, *names: str) -> None:
    """Fields this server does not do: refused when set, rather than silently ignored."""
    for name in names:
        if body.get(name) not in (None, False, [], 0):
            raise ApiError(400, f"'{name}' is not supported by runner serve", param=name)


# ---- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int    # prompt tokens whose KV cache was kept from the previous request

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.reused_tokens},
        }


class Reply:
    """The shapes of one reply: the whole answer, or its stream of chunks, sharing one id."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, streamed: bool) -> dict:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(False), "choices": [choice], "usage": usage.body()}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._head(True), "choices": [], "usage": usage.body()}
