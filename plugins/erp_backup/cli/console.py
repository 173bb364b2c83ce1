"""The CLI's output: results to stdout, messages and a TTY progress line to stderr, and value formatting."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO


class Console:
    """Results go to `out`; messages, warnings and the progress line to `err`.

    The progress line is drawn only when `err` is a TTY (one line, redrawn in place).
    """

    def __init__(self, out: TextIO, err: TextIO, tty: bool | None = None):
        self.out, self.err = out, err
        self.tty = _isatty(err) if tty is None else tty
        self._lock = threading.Lock()
        self._drawn = False

    def say(self, text: str = "") -> None:
        self.clear()
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.err, flush=True)

    def progress(self, text: str) -> None:
        if not self.tty:
            return
        with self._lock:
            self.err.write("\r" + text[:200] + "\x1b[K")
            self.err.flush()
            self._drawn = True

    def clear(self) -> None:
        with self._lock:
            if self._drawn:
                self.err.write("\r\x1b[K")
                self.err.flush()
                self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def utc_text(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip() for line in lines)
