"""A replica's trace events (the README's "Trace events") as JSON lines in its data
directory, for `pbft explain` over a real cluster: `pbft explain DATA*/trace-*.jsonl ...`.

Bounded: past `max_bytes` the file is renamed `.1` (`.1` to `.2`, ...; the oldest of
`keep` is deleted) and a new one begins, so a long run keeps its recent story. Times are
Unix ms, the one clock replicas on different machines share. Writes are buffered and
flushed at most every FLUSH_INTERVAL_S (and at close): the log explains, it is not a
record anything depends on, so it never waits for the disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO

DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_KEEP = 3
FLUSH_INTERVAL_S = 0.5


class TraceLog:
    def __init__(
        self,
        path: Path,
        node: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        if max_bytes < 1024 or keep < 1:
            raise ValueError("a trace log needs max_bytes >= 1024 and keep >= 1")
        self.path = Path(path)
        self.node = node
        self.max_bytes = max_bytes
        self.keep = keep
        self.rotations = 0
        self._handle: TextIO = open(self.path, "a", encoding="utf-8")
        self._size = self.path.stat().st_size
        self._flushed_at = time.monotonic()
        self._dirty = False

    def write(self, kind: str, detail: str = "", fields: dict[str, object] | None = None) -> None:
        event: dict[str, object] = {
            "time_ms": round(time.time() * 1000, 3),
            "kind": kind,
            "node": self.node,
            "detail": detail,
        }
        if fields:
            event.update(fields)
        line = json.dumps(event) + "\n"
        if self._size + len(line) > self.max_bytes and self._size > 0:
            self._rotate()
        self._handle.write(line)
        self._size += len(line)
        self._dirty = True
        self.maybe_flush()

    def maybe_flush(self) -> None:
        """Flush what is buffered if the last flush is FLUSH_INTERVAL_S old (the replica
        calls this every tick, so an idle replica's last events reach the file too)."""
        now = time.monotonic()
        if self._dirty and now - self._flushed_at >= FLUSH_INTERVAL_S:
            self._handle.flush()
            self._flushed_at = now
            self._dirty = False

    def _rotate(self) -> None:
        self._handle.close()
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._handle = open(self.path, "w", encoding="utf-8")
        self._size = 0
        self.rotations += 1

    def files(self) -> list[Path]:
        """The log's files, oldest first (the order `pbft explain` wants them in)."""
        rotated = [
            self.path.with_name(f"{self.path.name}.{index}") for index in range(self.keep, 0, -1)
        ]
        return [path for path in [*rotated, self.path] if path.exists()]

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
