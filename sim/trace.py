"""The simulation trace: one line per event, hashed as it goes.

The trace hash is the run's fingerprint: the same scenario and seed must give the
same hash on any machine and in any process (see tests/test_determinism.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import TextIO


class Trace:
    def __init__(self, sink: TextIO | None = None) -> None:
        self._hash = hashlib.sha256()
        self._sink = sink
        self.events = 0

    @property
    def writing(self) -> bool:
        """True when events go to a file: worth computing the fields only the file shows."""
        return self._sink is not None

    def record(
        self,
        time_us: int,
        kind: str,
        node: str,
        detail: str = "",
        fields: dict[str, object] | None = None,
    ) -> None:
        """`fields` (message type, payment ids, ...) go to the JSON lines only; the hash
        covers the line, so writing a trace file never changes the trace hash."""
        self.events += 1
        line = f"{time_us} {kind} {node} {detail}\n"
        self._hash.update(line.encode())
        if self._sink is not None:
            event: dict[str, object] = {
                "time_ms": time_us / 1000,
                "kind": kind,
                "node": node,
                "detail": detail,
            }
            if fields:
                event.update(fields)
            self._sink.write(json.dumps(event) + "\n")

    def annotate(
        self,
        time_us: int,
        kind: str,
        node: str,
        detail: str = "",
        fields: dict[str, object] | None = None,
    ) -> None:
        """An event for the trace file alone (what `pbft explain` reads: proposals,
        certificates, the run's settings), outside the hash and the event count and marked
        `"hashed": false`: a run's fingerprint stays the same whether anyone asks for the
        story or not."""
        if self._sink is None:
            return
        event: dict[str, object] = {
            "time_ms": time_us / 1000,
            "kind": kind,
            "node": node,
            "detail": detail,
            "hashed": False,
        }
        if fields:
            event.update(fields)
        self._sink.write(json.dumps(event) + "\n")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
