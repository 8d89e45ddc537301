"""mercure's notification templates rendered where they cannot hurt: a worker process with limits.

A rule's template is the site's, but what it renders comes from the case (``task.json``), and a
sandboxed Jinja template can still loop for ever (three nested ``range(100000)``) or build a
gigabyte string. A thread cannot be stopped, so the render runs in a long-lived worker process
(``python -I`` this file: it needs nothing but Jinja) that is killed when a render passes
:data:`TIME_LIMIT_SECONDS`, and refuses output over :data:`OUTPUT_LIMIT_CHARS` and memory over
:data:`MEMORY_LIMIT_BYTES`; the next render starts a fresh one (≈ 0.1 s). Any of these is a
:class:`RenderLimitError`, for which the caller sends a short fallback text. The caller blocks
for at most the time limit (callers on an event loop use a thread); renders are one at a time.

mercure's ``@rule@``, ``@task_id@`` and ``@event@`` placeholders are template variables here, not
text pasted into the template before it is parsed (mercure's way, in which a case id
``{{ 7*7 }}`` renders ``49``): a Jinja extension turns each placeholder in the template's text
into a variable output, and each one inside a string literal into a concatenation, so the output
for ordinary values is mercure's, byte for byte. No Prefect here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MEMORY_LIMIT_BYTES",
    "OUTPUT_LIMIT_CHARS",
    "PLACEHOLDERS",
    "TIME_LIMIT_SECONDS",
    "RenderLimitError",
    "TemplateRenderError",
    "render_bounded",
]

#: A render taking longer is stopped (its worker process killed).
TIME_LIMIT_SECONDS = 2.0
#: A worker process that has not started (imported Jinja) after this long is given up.
START_LIMIT_SECONDS = 30.0
#: Longest text a render may produce (characters).
OUTPUT_LIMIT_CHARS = 256 * 1024
#: Address space of the worker process: a template cannot take the host's memory.
MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
#: mercure's placeholders → the template variable each one becomes.
PLACEHOLDERS = {"@rule@": "_at_rule", "@task_id@": "_at_task_id", "@event@": "_at_event"}
_PLACEHOLDER = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")


class RenderLimitError(Exception):
    """The template passed a limit (time, output size, memory) or its process died."""


class TemplateRenderError(ValueError):
    """The template itself failed (syntax error, sandbox violation, ...), as it would in mercure."""


# --------------------------------------------------------------------------- the caller's side


class _Worker:
    """One worker process and its pipes; ready (Jinja imported) when constructed."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our interpreter, this file
            [sys.executable, "-I", str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:  # its start (imports, on a loaded host) does not count against a render's limit
            self._read_line(START_LIMIT_SECONDS, " to start")
        except RenderLimitError:
            self.kill()
            raise

    def ask(self, request: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        """Send one request and read its reply; ``RenderLimitError`` after ``seconds``."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise RenderLimitError(f"the render process is gone ({exc})") from None
        reply = dict(json.loads(self._read_line(seconds, "")))
        if reply.get("id") != request["id"]:  # never take another request's answer
            raise RenderLimitError("the render process answered out of turn")
        return reply

    def _read_line(self, seconds: float, what: str) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + seconds
        most = OUTPUT_LIMIT_CHARS * 12 + 4096  # JSON escapes a character in at most 12 bytes
        line = bytearray()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RenderLimitError(f"took longer than {seconds:g} s{what}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RenderLimitError("the render process died (memory?)")
            line += chunk
            if len(line) > most:
                raise RenderLimitError("the render process answered too much")
        return bytes(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


_lock = threading.Lock()
_worker: _Worker | None = None
_ids = itertools.count()


def render_bounded(
    source: str,
    variables: Mapping[str, Any],
    placeholders: Mapping[str, str] | None = None,
    *,
    seconds: float = TIME_LIMIT_SECONDS,
    limit: int = OUTPUT_LIMIT_CHARS,
) -> str:
    """``source`` rendered by a sandboxed Jinja with ``variables`` (JSON values) and mercure's
    placeholders' values (``{"@rule@": "ct"}``), within the limits.

    Raises:
        RenderLimitError: a limit was passed (the caller sends its fallback text).
        TemplateRenderError: the template failed as it would in mercure.
    """
    global _worker
    values = {PLACEHOLDERS[key]: value for key, value in (placeholders or {}).items()}
    request = {
        "id": next(_ids),
        "source": source,
        "variables": {**variables, **values},
        "limit": limit,
        "seconds": seconds,
    }
    with _lock:
        if _worker is None or _worker.process.poll() is not None:  # none yet, or it died idle
            _worker = _Worker()
        try:
            reply = _worker.ask(request, seconds)
        except RenderLimitError:
            _worker.kill()
            _worker = None
            raise
    if "text" in reply:
        return str(reply["text"])
    if reply.get("error") == "template":
        raise TemplateRenderError(str(reply.get("message")))
    raise RenderLimitError(str(reply.get("message")))


# --------------------------------------------------------------------------- the worker's side


def _placeholder_tokens(token: Any) -> Iterator[Any]:
    """A ``data`` or ``string`` token with mercure's placeholders as variables."""
    from jinja2.lexer import Token

    parts = _PLACEHOLDER.split(token.value)
    if len(parts) == 1:
        yield token
        return
    line = token.lineno
    if token.type == "data":
        for i, part in enumerate(parts):
            if i % 2:
                yield Token(line, "variable_begin", "{{")
                yield Token(line, "name", PLACEHOLDERS[part])
                yield Token(line, "variable_end", "}}")
            elif part:
                yield Token(line, "data", part)
        return
    yield Token(line, "lparen", "(")
    for i, part in enumerate(parts):
        if i:
            yield Token(line, "tilde", "~")
        yield Token(line, "name", PLACEHOLDERS[part]) if i % 2 else Token(line, "string", part)
    yield Token(line, "rparen", ")")


def _environment() -> Any:
    from jinja2.ext import Extension
    from jinja2.lexer import TokenStream
    from jinja2.sandbox import SandboxedEnvironment

    class PlaceholderVariables(Extension):
        def filter_stream(self, stream: TokenStream) -> Iterator[Any]:
            for token in stream:
                if token.type in ("data", "string"):
                    yield from _placeholder_tokens(token)
                else:
                    yield token

    return SandboxedEnvironment(extensions=[PlaceholderVariables])


def _render_one(environment: Any, request: dict[str, Any]) -> dict[str, Any]:
    limit = int(request["limit"])
    try:
        template = environment.from_string(request["source"])
        chunks: list[str] = []
        size = 0
        for chunk in template.generate(request["variables"]):
            size += len(chunk)
            if size > limit:
                return {"error": "limit", "message": f"longer than {limit} characters"}
            chunks.append(chunk)
        return {"text": "".join(chunks)}
    except MemoryError:
        return {"error": "limit", "message": f"needed more than {MEMORY_LIMIT_BYTES} bytes"}
    except Exception as exc:  # noqa: BLE001 - whatever the template raised is its error
        return {"error": "template", "message": f"{type(exc).__name__}: {exc}"}


def _serve() -> None:
    """The worker: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]
    environment = _environment()
    sys.stdout.write("{}\n")  # ready
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        # The kernel stops a render its caller can no longer stop (the caller was killed):
        # SIGXCPU once it used a few seconds of CPU more than the worker has so far.
        used = resource.getrusage(resource.RUSAGE_SELF)
        spent = math.ceil(used.ru_utime + used.ru_stime)
        cap = spent + math.ceil(float(request.get("seconds", TIME_LIMIT_SECONDS))) + 2
        if hard_cpu == resource.RLIM_INFINITY or cap < hard_cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (cap, hard_cpu))
        reply = {**_render_one(environment, request), "id": request.get("id")}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
