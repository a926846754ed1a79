"""`melange run --log-format json`: one JSON object per log line, for log collectors.

Each line holds `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`, and when
there is one, `exception` (the formatted traceback) and `object` (the Kubernetes object a Kopf
object logger names). The standard library's `logging` only: no dependency of its own.

Kopf puts its own handler on the root logger when the operator starts (plain text). So that
every record is written once, as JSON, the JSON handler goes on the top-level loggers that exist
when logging is configured (`melange`, `kopf`, `aiohttp`, `kubernetes`, ...), which stop passing
records up to the root; their levels still follow the root's, which `--verbose` sets.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
#: Always given the JSON handler, even when nothing has logged to them yet.
OWN_LOGGERS = ("melange", "kopf")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, logger, message (exception, object)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        reference = getattr(record, "k8s_ref", None)
        if isinstance(reference, dict):
            line["object"] = {k: v for k, v in reference.items() if v is not None}
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_json_logging(stream: TextIO | None = None) -> logging.Handler:
    """Send every logger that exists now (and its children, later ones too) to one JSON handler
    on `stream` (default: stderr), and no longer to the root logger's handlers."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    existing = {name.partition(".")[0] for name in logging.Logger.manager.loggerDict}
    for name in sorted(existing | set(OWN_LOGGERS)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [h for h in logger.handlers if not _is_json_handler(h)]
        logger.addHandler(handler)
        logger.propagate = False
    return handler


def _is_json_handler(handler: logging.Handler) -> bool:
    return isinstance(handler.formatter, JsonFormatter)
