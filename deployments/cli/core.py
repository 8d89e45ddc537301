"""What every ``dicom-dispatch`` command shares: exit codes, error lines, tables, JSON, progress.

Exit codes: 0 success, 1 the operation failed, 2 usage error. An error is one line on stderr,
``dicom-dispatch: <message>``, never a traceback: an exception nobody expected (a bug) is one
line too, naming its type and where it was raised, exit 1.

Output: ``--json`` prints one JSON document on stdout and nothing else. Human output is a rich
table when stdout is a terminal and plain space-aligned columns otherwise, so a pipe into
``awk``/``grep`` reads the same as it always did. Progress bars go to stderr, only when it is a
terminal and ``--json`` is off: scripts see no difference.

Nothing here imports Prefect, rich or httpx at module level: ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from blocks.errors import DispatchError, JobRefusedError, QueryError, first_line

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "CommandFailed",
    "ProgressBar",
    "UsageError",
    "add_command",
    "exit_code_for",
    "listening",
    "poll_while",
    "print_json",
    "report_failure",
    "run",
    "short",
    "table",
    "version",
]

_T = TypeVar("_T")

PROG = "dicom-dispatch"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
#: How often a progress bar that watches something (folders, a batch) looks again.
POLL_SECONDS = 0.5

#: ``handler(args, home)`` returns the exit code (a coroutine for commands that talk to Prefect).
Handler = Callable[[argparse.Namespace, Path], "int | Awaitable[int]"]


class UsageError(Exception):
    """A user mistake on the command line that argparse cannot see (exit 2)."""


class CommandFailed(Exception):
    """The operation did not succeed; the message says why (exit 1)."""


# --------------------------------------------------------------------------- errors -> exit codes


def _api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or "the ephemeral Prefect server"


def exit_code_for(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and the one line to print for an expected error; ``None`` for a bug.

    The HTTP and Prefect exception types are looked up only if their modules were imported:
    an error of a library that was never loaded cannot be the one raised.
    """
    if isinstance(exc, UsageError | JobRefusedError | QueryError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, CommandFailed | DispatchError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, TimeoutError):
        return EXIT_FAILED, str(exc) or "timed out"
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return EXIT_FAILED, f"cannot reach the Prefect API at {_api_url()}: {first_line(exc)}"
    if httpx is not None and isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return EXIT_FAILED, f"the Prefect API answered {status}: {short(str(exc), 200)}"
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if prefect_exceptions is not None and isinstance(exc, prefect_exceptions.ObjectNotFound):
        return EXIT_FAILED, f"not found in the Prefect API: {short(str(exc), 200)}"
    return None


def error_line(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def run(args: argparse.Namespace, home: Path, before: Callable[[], object] | None = None) -> int:
    """Run the command's handler (``before`` first); expected errors become an exit code."""
    try:
        if before is not None:
            before()
            _console_without_tracebacks()
        handler: Handler = args.handler
        outcome = handler(args, home)
        if inspect.isawaitable(outcome):
            return int(asyncio.run(_awaited(outcome)))
        return int(outcome)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        return report_failure(exc)


class _NoTraceback(logging.Filter):
    """Drops a record's traceback on its way to the terminal (the API's copy, in the run's
    logs in the UI, was handed over first: a run logger's own handler sees a record before
    the root's console handler does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _console_without_tracebacks() -> None:
    """A command that runs flows prints Prefect's log lines, not their tracebacks: a failed
    send is the case's failed attempt, told in one line, not a crash of the command."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler on root, as its first use would

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def report_failure(exc: Exception) -> int:
    """The one line on stderr for an exception that ends a command; its exit code."""
    code, message = exit_code_for(exc) or (EXIT_FAILED, unexpected(exc))
    error_line(message)
    return code


def unexpected(exc: BaseException) -> str:
    """A bug's one line: its type, its message and the innermost place it was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else ""
    return f"unexpected error (please report it): {type(exc).__name__}: {first_line(exc)}{where}"


async def _awaited(outcome: Awaitable[int]) -> int:
    return await outcome


def version() -> str:
    try:
        return metadata.version("dicom-dispatch")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def short(text: str | None, width: int = 60) -> str:
    """One line of at most ``width`` characters: a traceback's last line, else the first line."""
    if not text or not text.strip():
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1].strip() if text.lstrip().startswith("Traceback") else first_line(text)
    return line if len(line) <= width else line[: width - 1] + "…"


# --------------------------------------------------------------------------- parsers


def add_command(
    subparsers: Any, name: str, handler: Handler, help: str, **parser_options: Any
) -> argparse.ArgumentParser:
    """A sub-command with ``--json`` (every command has it) whose handler is ``handler``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, **parser_options)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=handler)
    return parser


# --------------------------------------------------------------------------- output


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], title: str | None = None) -> None:
    """Rows under a header (``None`` shows empty); ``title`` is printed as a line above them."""
    cells = [[_cell(c) for c in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        rich_table = Table(
            *header, title=title, title_justify="left", box=None, header_style="bold"
        )
        for row in cells:
            rich_table.add_row(*row)
        Console().print(rich_table)
        return
    if title is not None:
        print(title)
    lines = [list(header), *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


class ProgressBar:
    """Bars on stderr when it is a terminal and the output is not JSON; else it does nothing.

    ``update`` may be called from any thread (rich serializes its display).
    """

    def __init__(self, as_json: bool) -> None:
        self.enabled = not as_json and sys.stderr.isatty()
        self._progress: Progress | None = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                # Lines printed while a bar shows go above it, but only when stdout is the
                # terminal too: piped stdout must receive them itself.
                redirect_stdout=sys.stdout.isatty(),
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def add(self, description: str, total: int | None = None) -> int:
        """A new bar; its id for ``update`` (-1 when disabled)."""
        if self._progress is None:
            return -1
        return int(self._progress.add_task(description, total=total))

    def update(self, bar: int, completed: int, total: int | None = None) -> None:
        if self._progress is not None and bar >= 0:
            from rich.progress import TaskID

            self._progress.update(TaskID(bar), completed=completed, total=total)


async def poll_while(
    work: Awaitable[_T],
    bar: ProgressBar,
    description: str,
    look: Callable[[], tuple[int, int | None]],
) -> _T:
    """Await ``work`` while a bar shows ``look()`` (done, total), read every POLL_SECONDS."""
    if not bar.enabled:
        return await work
    task_id = bar.add(description)

    async def watch() -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                bar.update(task_id, *look())
            await asyncio.sleep(POLL_SECONDS)

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        with contextlib.suppress(OSError, ValueError):
            bar.update(task_id, *look())


@contextlib.contextmanager
def listening(
    listeners: list[Callable[[int, int | None], None]], bar: ProgressBar, what: str
) -> Iterator[None]:
    """Feed a push-style progress hook (``listener(done, total)``) into a bar while inside."""
    if not bar.enabled:
        yield
        return
    task_id = bar.add(what)

    def listener(done: int, total: int | None) -> None:
        bar.update(task_id, done, total)

    listeners.append(listener)
    try:
        yield
    finally:
        listeners.remove(listener)
