"""The audit log of catalog writes: one JSON line per write, appended, flushed and fsynced.

    {"time": "2026-11-30T10:43:32.123456+00:00", "key_id": "ci", "action": "put", "ids": ["1163"],
     "result": "ok", "status": 200, "version": "20261130T104332123456Z", "changes": {"1163": "added"}}

`key_id` is the id of the API key in settings (null for a refused key), never the key. `result` is
ok | invalid | not_found | queue_full | busy | failed | forbidden; `status` the HTTP status answered.
Lines are written with one `write` on a file opened for appending (O_APPEND), so replicas sharing the
file never interleave inside a line. Nothing here rewrites or truncates the file.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MAX_LOGGED_IDS = 1000  # a batch lists its ids; beyond this many only the count is kept


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, *, key_id: str | None, action: str, ids: list[str], result: str, status: int,
               version: str | None = None, **extra: Any) -> None:  # fmt: skip
        entry = {
            "time": datetime.now(timezone.utc).isoformat(),
            "key_id": key_id,
            "action": action,
            "ids": ids[:MAX_LOGGED_IDS],
            "result": result,
            "status": status,
        }
        if len(ids) > MAX_LOGGED_IDS:
            entry["ids_count"] = len(ids)
        if version is not None:
            entry["version"] = version
        entry.update({name: value for name, value in extra.items() if value is not None})
        # ensure_ascii: ids and messages may carry any text (lone surrogates included); the line stays ASCII.
        line = (json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=str) + "\n").encode("ascii")
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # the write itself is done (or refused) already; say so loudly
                log.error("audit log %s not written (%s): %s", self.path, exc, line.decode().strip())
