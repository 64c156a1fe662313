"""Chat templates rendered with limits: a template that came with a model is code from the internet.

transformers renders a tokenizer's Jinja chat template in jinja2's sandbox, but without limits: a
template can ask for `'a' * 1000000000` (killed by the kernel's OOM killer), loop for minutes, or
raise with a 40-line traceback. runner renders it in a child process of its own, which
  - runs jinja2's ImmutableSandboxedEnvironment with what transformers gives templates (the
    `raise_exception`, `strftime_now`, `dict` and `namespace` globals, its `tojson`, the
    loopcontrols extension and the `{% generation %}` tag, trim_blocks and lstrip_blocks), so the
    text, and so the token ids, are those of `apply_chat_template`;
  - limits its own address space (RLIMIT_AS, MEMORY_LIMIT) and the text's length (OUTPUT_CHARS
    plus a few times the messages' length), refusing a repeated string before it is made;
and the parent waits at most RENDER_SECONDS before it kills the child. Every failure becomes one
`ChatTemplateError` line. The child stays up for the next render: one per runner process, started on
the first chat turn (about a tenth of a second), replaced if it had to be killed.

    ids = chat_token_ids(tokenizer, messages, spec.name)    # a Hugging Face tokenizer (or mlx-lm's wrapper)
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from runner.errors import UserInputError
from runner.words import one_line

RENDER_SECONDS = 10.0           # a real template renders a long chat in milliseconds
MEMORY_LIMIT = 1 << 30          # the child's address space: Python and jinja2 take ~50 MB of it
OUTPUT_CHARS = 1_000_000        # markup a template may add to the messages (plus OUTPUT_PER_INPUT x them)
OUTPUT_PER_INPUT = 8


class ChatTemplateError(UserInputError):
    """A model's chat template failed, or asked for more time or memory than a chat template needs."""


def chat_token_ids(tokenizer: Any, messages: Sequence[Any], name: str, *, seconds: float = RENDER_SECONDS) -> list[int]:
    """Token ids of `messages` (role and content) rendered with the tokenizer's chat template and a
    generation prompt, as `apply_chat_template(..., add_generation_prompt=True)` gives them."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as error:   # no template, or several and none is "default"
        raise ChatTemplateError(f"{name}: {one_line(str(error), 300)}") from None
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    variables = {key: value for key, value in tokenizer.special_tokens_map.items() if value is not None}
    text = render(template, conversation, variables, name, seconds=seconds)
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def render(template: str, messages: list[dict], variables: dict, name: str, *, seconds: float = RENDER_SECONDS) -> str:
    """The template's text for `messages` with a generation prompt, rendered in the limited child."""
    size = sum(len(str(m.get("content", ""))) for m in messages)
    request = {"template": template, "messages": messages, "variables": variables,
               "max_chars": OUTPUT_CHARS + OUTPUT_PER_INPUT * size}
    reply = _RENDERER.exchange(request, seconds, name)
    if "error" in reply:
        raise ChatTemplateError(f"{name}: the chat template failed: {reply['error']}")
    return reply["text"]


# ---- the parent's side ------------------------------------------------------------------------


class _Renderer:
    """The child process and one exchange with it at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def exchange(self, request: dict, seconds: float, name: str) -> dict:
        line = (json.dumps(request) + "\n").encode()
        with self._lock:
            process = self._started()
            if not self._send(process, line):   # the child died since the last render: start it again, once
                self._stop()
                process = self._started()
                if not self._send(process, line):
                    self._stop()
                    raise ChatTemplateError(f"{name}: the chat template renderer does not start ({sys.executable})")
            reply = self._read_reply(process, seconds)
            if reply is None:
                self._stop()
                return {"error": f"rendering it took more than {seconds:g} s (stopped)"}
            if process.poll() is not None:
                self._stop()
            return reply

    @staticmethod
    def _send(process: subprocess.Popen, line: bytes) -> bool:
        try:
            process.stdin.write(line)
            process.stdin.flush()
            return True
        except OSError:   # BrokenPipeError: it is gone
            return False

    def _started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            source = str(Path(__file__).resolve().parents[1])   # the folder holding the runner package
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
            self._process = subprocess.Popen(
                [sys.executable, "-c", "from runner.templates import serve; serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            )
        return self._process

    def _read_reply(self, process: subprocess.Popen, seconds: float) -> dict | None:
        """The child's one-line JSON reply; an error if it died; None if it did not come within `seconds`."""
        deadline = time.monotonic() + seconds
        chunks: list[bytes] = []
        fd = process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(fd, 1 << 20)
                if not chunk:   # it died: out of memory inside C code, or killed
                    return {"error": f"rendering it needs more than {MEMORY_LIMIT >> 20} MB of memory or crashed "
                                     f"(exit {process.wait()})"}
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    return json.loads(b"".join(chunks))

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
            self._process = None


_RENDERER = _Renderer()


# ---- the child's side -------------------------------------------------------------------------


class OutputTooLarge(Exception):
    pass


def serve() -> None:
    """The child: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ValueError, OSError):   # macOS does not enforce it; the output limit and the timeout still hold
        pass
    compiled: dict[str, Any] = {}
    for line in sys.stdin:
        try:
            reply = {"text": _render_request(json.loads(line), compiled)}
        except MemoryError:
            reply = {"error": f"rendering it needs more than {MEMORY_LIMIT >> 20} MB of memory"}
        except OutputTooLarge as error:
            reply = {"error": str(error)}
        except Exception as error:   # a template can make Python raise anything: each is the template's error
            reply = {"error": _describe(error)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _describe(error: Exception) -> str:
    import jinja2

    if isinstance(error, jinja2.TemplateSyntaxError):
        return one_line(f"syntax error at line {error.lineno}: {error.message}", 300)
    if isinstance(error, jinja2.exceptions.SecurityError):
        return one_line(f"the sandbox refused it: {error}", 300)
    if isinstance(error, jinja2.TemplateError):
        return one_line(str(error) or type(error).__name__, 300)
    return one_line(f"{type(error).__name__}: {error}", 300)


def _render_request(request: dict, compiled: dict) -> str:
    template = request["template"]
    if template not in compiled:
        compiled.clear()
        compiled[template] = _environment(request["max_chars"]).from_string(template)
    renderer = compiled[template]
    renderer.environment.max_chars = request["max_chars"]
    variables = dict(request["variables"], messages=request["messages"], tools=None, documents=None,
                     add_generation_prompt=True)
    parts, length = [], 0
    for part in renderer.generate(**variables):
        length += len(part)
        if length > request["max_chars"]:
            raise OutputTooLarge(f"its text grew past {request['max_chars']:,} characters (stopped)")
        parts.append(part)
    return "".join(parts)


def _environment(max_chars: int):
    """jinja2's immutable sandbox with transformers' additions (transformers 5.x chat_template_utils,
    `_cached_compile_jinja_template`), and string or list repetition bounded by `max_chars`."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks an assistant turn for training masks: the
        text is the body's."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*"})

        def call_binop(self, context, operator, left, right):
            sequences = (str, list, tuple)
            if operator == "*" and isinstance(left, sequences) != isinstance(right, sequences):
                sequence, times = (left, right) if isinstance(left, sequences) else (right, left)
                if isinstance(times, int) and len(sequence) * times > self.max_chars:
                    raise OutputTooLarge(f"it asks for a text of {len(sequence) * times:,} characters, more than "
                                         f"{self.max_chars:,} (stopped)")
            return super().call_binop(context, operator, left, right)

    class TemplateDict:   # `dict(...)` in a template, without access to the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):   # no underscore names: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for key in attributes:
                TemplateNamespace._check(key)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, key, value):
            TemplateNamespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold {key!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    environment.max_chars = max_chars
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    return environment
