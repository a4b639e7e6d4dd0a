"""Structured logs: one JSON event per decision on stdout, for journald.

Events carry ids and reasons, never keys, payloads or decrypted results.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import structlog

# syslog priorities, which journald reads from a `<N>` prefix on each stdout line
# (SyslogLevelPrefix=, on by default), so that `journalctl -p err` finds our errors.
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = ("debug", "info", "warning", "error")


class JournalPriority:
    """Renders the event as JSON with its syslog priority in front, for journald."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: Any) -> str:
        priority = PRIORITY.get(str(event.get("level", "")), 6)
        rendered = self._json(logger, method, event)
        text = rendered.decode() if isinstance(rendered, bytes) else rendered
        return f"<{priority}>{text}"


def to_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stdout is journald's stream (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device and inode):
        return False
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == stream


def configure(*, json: bool = True, level: int | str = logging.INFO) -> None:
    if isinstance(level, str):
        level = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        (JournalPriority() if to_journal() else structlog.processors.JSONRenderer())
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(**bound)
    return logger
