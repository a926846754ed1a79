"""`melange run --log-format json`: one JSON object per log line, for log collectors.

Each line holds `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`, and when
there is one, `exception` (the formatted traceback), `stack` (`stack_info`) and `object` (the
Kubernetes object a Kopf object logger names), in that order, and nothing else.

Kopf writes every log line: `kopf.configure` puts one handler on the root logger, and every other
logger passes its records up to it. For JSON, `melange run` hands `JsonFormatter` to the operator's
start, which sets it on that handler. The formatter is python-json-logger's (Kopf's own JSON logs
are built on it too), with the field names above and UTC times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pythonjsonlogger import json as jsonlogger

#: A line's keys, in this order; the last three only when the record has them.
FIELDS = ("time", "level", "logger", "message", "exception", "stack", "object")


class JsonFormatter(jsonlogger.JsonFormatter):
    """A record as one line of JSON: time, level, logger, message (exception, stack, object)."""

    # `time`: logging.Formatter.formatTime with these, e.g. 2026-12-01T07:16:10.349Z
    converter: Callable[[float | None], time.struct_time] = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
                "k8s_ref": "object",  # what Kopf's object loggers add to their records
            },
            json_ensure_ascii=False,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        """The documented keys only (not the other `extra` attributes of a record, such as Kopf's
        `settings`), and the object reference without its empty parts."""
        line = {key: log_data[key] for key in FIELDS if key in log_data}
        reference = line.pop("object", None)
        if isinstance(reference, dict):
            line["object"] = {k: v for k, v in reference.items() if v is not None}
        return line
