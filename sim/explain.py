"""`pbft explain`: the story of one payment, one view or one replica, told from a trace.

The input is JSON lines, one event per line, as `pbft run --trace` writes them (the schema
is in the README, "Trace events"). Nothing here knows the simulator: a real replica's log
with the same events reads the same way, and several files (one per replica) are merged
by time. Every query reads the files as a stream, at most twice, and keeps only what its
story needs, so a long trace costs time, not memory.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

# A line longer than this is not a trace event (a NEW-VIEW's plan is the longest, ~10 KB).
MAX_LINE_BYTES = 1 << 20
# Payments whose latency is kept to tell what "slow" is (the typical latency of the run).
MAX_LATENCIES = 1 << 20
# Items of each kind a story lists before saying how many more there were.
MAX_LISTED = 20

Event = dict[str, Any]

_PAYMENT_ID = re.compile(r"^(?:pay_(\d{1,10})_(\d{1,20})|(\d{1,10}):(\d{1,20}))$")
_REPLICA = re.compile(r"^r(\d+)'?$")
# What each suspicion names as its reason, and the timer behind it (pbft/viewchanges.py).
TIMERS = {
    "no heartbeat": "the heartbeat timer (the primary sent nothing)",
    "request not ordered": "the request timer (a request waited too long to be proposed)",
    "work not completed": "the progress timer (accepted work did not execute)",
}


class ExplainError(Exception):
    """A trace that cannot be read or a question it cannot answer: one line for the user."""


def parse_payment_id(text: str) -> str:
    """`CLIENT:REQUEST` or the gateway's `pay_CLIENT_REQUEST`, as "CLIENT:REQUEST"."""
    match = _PAYMENT_ID.match(text.strip())
    if match is None:
        raise ExplainError(
            f"--payment {text!r}: expected CLIENT:REQUEST (e.g. 0:12) or pay_CLIENT_REQUEST"
        )
    client, request = (match[1], match[2]) if match[1] is not None else (match[3], match[4])
    return f"{int(client)}:{int(request)}"


def iter_events(paths: Sequence[str]) -> Iterator[Event]:
    """The events of every file, merged by time (each file is in time order)."""
    streams = [_read(path) for path in paths]
    if len(streams) == 1:
        yield from streams[0]
        return
    yield from heapq.merge(*streams, key=lambda event: event["time_ms"])


def _read(path: str) -> Iterator[Event]:
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise ExplainError(f"{path}: {error.strerror or error}") from None
    with handle:
        number = 0
        while True:
            line = handle.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise ExplainError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES} bytes")
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise ExplainError(f"{path}:{number}: not a JSON trace event") from None
            if (
                not isinstance(event, dict)
                or not isinstance(event.get("time_ms"), int | float)
                or isinstance(event.get("time_ms"), bool)
                or not isinstance(event.get("kind"), str)
                or not isinstance(event.get("node"), str)
            ):
                raise ExplainError(
                    f"{path}:{number}: not a trace event (needs time_ms, kind and node)"
                )
            yield event


def _ints(value: object) -> list[int]:
    return [item for item in value if isinstance(item, int)] if isinstance(value, list) else []


def _strings(value: object) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _replica_of(node: str) -> int | None:
    match = _REPLICA.match(node)
    return int(match[1]) if match else None


def _view_of(event: Event) -> int | None:
    """The view a view_change or new_view event is about."""
    view = event.get("view")
    if isinstance(view, int):
        return view
    match = re.search(r"(?:to view|^view) (\d+)", str(event.get("detail", "")))
    return int(match[1]) if match else None


def _about(event: Event) -> Event:
    """The message an event is about: a drop's `message`, or the event itself."""
    message = event.get("message")
    return message if isinstance(message, dict) else event


@dataclass
class _Capped:
    """A list that keeps the first MAX_LISTED items and counts the rest."""

    items: list[Any] = field(default_factory=list)
    more: int = 0

    def add(self, item: Any) -> None:
        if len(self.items) < MAX_LISTED:
            self.items.append(item)
        else:
            self.more += 1

    def json(self) -> dict[str, Any]:
        return {"items": self.items, "more": self.more}


def _line(event: Event) -> dict[str, Any]:
    return {
        "time_ms": event["time_ms"],
        "kind": event["kind"],
        "node": event["node"],
        "detail": str(event.get("detail", "")),
    }


# --- one payment ------------------------------------------------------------------------


def explain_payment(paths: Sequence[str], payment: str) -> dict[str, Any]:
    """The life of one payment (see the README's "pbft explain")."""
    settings: Event = {}
    submitted: Event | None = None
    decided: Event | None = None
    proposals: list[Event] = []
    latencies: list[float] = []
    submits: dict[str, float] = {}
    # Pass 1: where the payment went (its seqs and views), and the run's typical latency.
    for event in iter_events(paths):
        kind = event["kind"]
        if kind == "settings" and not settings:
            settings = event
        elif kind == "submit":
            if event.get("payment") == payment and submitted is None:
                submitted = event
            if len(submits) < MAX_LATENCIES and isinstance(event.get("payment"), str):
                submits[event["payment"]] = event["time_ms"]
        elif kind == "decided":
            at = submits.pop(str(event.get("payment")), None)
            if at is not None:
                latencies.append(event["time_ms"] - at)
            if event.get("payment") == payment and decided is None:
                decided = event
        elif kind == "propose" and payment in _strings(event.get("payments")):
            # A primary re-sends its PRE-PREPARE to laggards: one batch, told once.
            if not any(
                (seen["node"], seen.get("view"), seen.get("seq"))
                == (event["node"], event.get("view"), event.get("seq"))
                for seen in proposals
            ):
                proposals.append(event)
    if submitted is None and decided is None and not proposals:
        raise ExplainError(f"payment {payment} does not appear in the trace")
    slots = dict.fromkeys((event.get("view"), event.get("seq")) for event in proposals)
    seqs = dict.fromkeys(seq for _, seq in slots if isinstance(seq, int))
    if submitted is not None:
        start = submitted["time_ms"]
    elif proposals:
        start = proposals[0]["time_ms"]
    else:
        start = decided["time_ms"] if decided is not None else 0.0
    end = decided["time_ms"] if decided else None

    timeline: list[dict[str, Any]] = []
    replicas: dict[str, dict[str, Any]] = {}
    replies: list[dict[str, Any]] = []
    arrivals: list[dict[str, Any]] = []
    lost = _Capped()
    lost_reasons: Counter[str] = Counter()
    views: list[dict[str, Any]] = []
    proposer_inflight: dict[str, dict[str, Any]] = {}
    # The proposers' pipelines, to see a full window: node -> proposed and executed seqs.
    proposed_by: dict[str, dict[int, None]] = {}
    executed_at: dict[str, int] = {}
    first_proposer = proposals[0]["node"] if proposals else None
    told: dict[tuple[str, object, object], None] = {}
    limit = settings.get("max_inflight_batches")

    def about_us(event: Event) -> bool:
        message = _about(event)
        if message.get("payment") == payment:
            return True
        # A REPLY names its batch's seq too: only the votes of our seq are about us.
        return (
            message.get("message_type") in _ORDERING
            and message.get("seq") in seqs
            and (message.get("view"), message.get("seq")) in slots
        )

    # Pass 2: everything that happened to it.
    for event in iter_events(paths):
        kind = event["kind"]
        at = event["time_ms"]
        node = event["node"]
        if kind == "propose":
            seq = event.get("seq")
            if isinstance(seq, int):
                proposed_by.setdefault(node, {})[seq] = None
            if payment in _strings(event.get("payments")):
                batch = (node, event.get("view"), seq)
                again = batch in told
                told[batch] = None
                detail = (
                    f"re-sent its PRE-PREPARE for seq {seq}"
                    if again
                    else f"proposed by primary {node} in view {event.get('view')} at seq "
                    f"{seq}, a batch of {len(_strings(event.get('payments')))}"
                )
                timeline.append({**_line(event), "detail": detail})
            continue
        if kind == "execute":
            seq = event.get("seq")
            if isinstance(seq, int):
                executed_at[node] = max(executed_at.get(node, 0), seq)
        if kind == "submit" and event.get("payment") == payment:
            timeline.append({**_line(event), "detail": f"submitted by {node}: {event['detail']}"})
        elif kind in ("prepared", "committed") and payment in _strings(event.get("payments")):
            entry = replicas.setdefault(node, {})
            entry[kind] = {
                "time_ms": at,
                "seq": event.get("seq"),
                "view": event.get("view"),
                "signers": _ints(event.get("signers")),
            }
            timeline.append(
                {
                    **_line(event),
                    "detail": f"{kind} seq {event.get('seq')}"
                    f"{' in view ' + str(event.get('view')) if kind == 'prepared' else ''}, "
                    f"certificate signed by {_names(_ints(event.get('signers')))}",
                }
            )
        elif kind == "execute":
            for result in event.get("results") or []:
                if isinstance(result, dict) and result.get("payment") == payment:
                    entry = replicas.setdefault(node, {})
                    entry["executed"] = {
                        "time_ms": at,
                        "seq": event.get("seq"),
                        "outcome": result.get("outcome"),
                        "reason": result.get("reason") or "none",
                        "fresh": result.get("fresh"),
                    }
                    reason = f" ({result.get('reason')})" if result.get("reason") else ""
                    again = "" if result.get("fresh", True) else ", decided before"
                    timeline.append(
                        {
                            **_line(event),
                            "detail": f"executed at seq {event.get('seq')}: "
                            f"{result.get('outcome')}{reason}{again}",
                        }
                    )
        elif kind == "deliver" and event.get("payment") == payment:
            if event.get("message_type") == "REPLY":
                replies.append({"time_ms": at, "from": event.get("from"), "to": node})
            elif event.get("message_type") == "REQUEST":
                sender = event.get("from")
                if not any(item["from"] == sender and item["to"] == node for item in arrivals):
                    timeline.append(
                        {**_line(event), "detail": f"request delivered to {node} from {sender}"}
                    )
                arrivals.append({"time_ms": at, "from": sender, "to": node})
                if node == first_proposer and node not in proposer_inflight:
                    inflight = len(
                        [s for s in proposed_by.get(node, ()) if s > executed_at.get(node, 0)]
                    )
                    proposer_inflight[node] = {"time_ms": at, "in_flight": inflight}
        elif kind == "decided" and event.get("payment") == payment:
            timeline.append(
                {
                    **_line(event),
                    "detail": f"receipt formed at {node}: {event.get('outcome')}"
                    f"{' (' + str(event.get('reason')) + ')' if event.get('reason') else ''}"
                    f" at seq {event.get('seq')}",
                }
            )
        elif kind in ("lost", "drop") and about_us(event):
            message = _about(event)
            reason = str(event.get("reason") or str(event.get("detail", "")).split(" ")[0])
            lost_reasons[reason] += 1
            item = {
                "time_ms": at,
                "where": node,
                "from": message.get("from"),
                "message_type": message.get("message_type"),
                "seq": message.get("seq"),
                "reason": reason,
                "by": "network" if kind == "lost" else "replica",
            }
            if not lost.items or lost.items[-1]["reason"] != reason or len(lost.items) < 3:
                timeline.append(
                    {
                        **_line(event),
                        "detail": f"{message.get('message_type')} from {message.get('from')} "
                        f"{'lost at' if kind == 'lost' else 'dropped by'} {node}: {reason}",
                    }
                )
            lost.add(item)
        elif kind in ("suspect", "view_change", "new_view") and (
            at >= start and (end is None or at <= end)
        ):
            views.append(_line(event))
            if len(views) <= MAX_LISTED:
                timeline.append({**_line(event), "detail": f"{kind}: {event.get('detail', '')}"})
    timeline.sort(key=lambda item: (item["time_ms"], _RANK.get(item["kind"], 9)))
    latency = (end - start) if end is not None else None
    typical = median(latencies) if latencies else None
    # Replicas' own logs hold no client events: the outcome is the replicas' execution,
    # and whether it was slow cannot be told.
    executions = [entry["executed"] for entry in replicas.values() if "executed" in entry]
    if submitted is None:
        slow = False
    else:
        slow = latency is None or (
            typical is not None and latency >= 2 * typical and latency - typical >= 20
        )
    waited = (
        _waited_on(
            views, lost, lost_reasons, arrivals, proposer_inflight, limit, settings, submitted
        )
        if slow
        else []
    )
    return {
        "payment": payment,
        "submitted_ms": start,
        "decided_ms": end,
        "latency_ms": round(latency, 3) if latency is not None else None,
        "typical_latency_ms": round(typical, 3) if typical is not None else None,
        "slow": slow,
        "outcome": decided.get("outcome")
        if decided
        else (executions[0]["outcome"] if executions else None),
        "reason": (decided.get("reason") or "none")
        if decided
        else (executions[0]["reason"] if executions else None),
        "client_events": submitted is not None,
        "batches": [
            {
                "view": event.get("view"),
                "seq": event.get("seq"),
                "primary": event["node"],
                "time_ms": event["time_ms"],
            }
            for event in proposals
        ],
        "replicas": dict(sorted(replicas.items())),
        "replies": replies[:MAX_LISTED],
        "request_arrivals": arrivals[:MAX_LISTED],
        "lost": lost.json(),
        "lost_by_reason": dict(sorted(lost_reasons.items())),
        "view_events": views[:MAX_LISTED],
        "waited_on": waited,
        "timeline": timeline,
    }


_ORDERING = ("PRE_PREPARE", "PREPARE", "COMMIT")
_RANK = {"submit": 0, "propose": 1, "prepared": 2, "committed": 3, "execute": 4, "decided": 5}


def _names(replicas: list[int]) -> str:
    return ", ".join(f"r{replica}" for replica in replicas) or "nobody"


def _waited_on(
    views: list[dict[str, Any]],
    lost: _Capped,
    reasons: Counter[str],
    arrivals: list[dict[str, Any]],
    proposer_inflight: dict[str, dict[str, Any]],
    limit: object,
    settings: Event,
    submitted: Event | None,
) -> list[str]:
    """What a slow payment waited on, each cause with the evidence for it."""
    causes = []
    changes = [item for item in views if item["kind"] == "view_change"]
    if changes:
        suspicions = [item for item in views if item["kind"] == "suspect"]
        installed = [item for item in views if item["kind"] == "new_view"]
        if suspicions:
            first = suspicions[0]
            text = (
                f"a view change: {first['node']} suspected the primary at "
                f"{first['time_ms']:.1f} ms ({first['detail']})"
            )
        else:
            text = (
                f"a view change: {changes[0]['node']} moved {changes[0]['detail']} at "
                f"{changes[0]['time_ms']:.1f} ms"
            )
        if installed:
            text += (
                f"; the new view was installed at {installed[0]['time_ms']:.1f} ms "
                f"({installed[0]['detail']}, see --view)"
            )
        causes.append(text)
    if lost.items:
        counts = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        first_lost = lost.items[0]
        causes.append(
            f"lost messages ({counts}); the first: {first_lost['message_type']} from "
            f"{first_lost['from']} to {first_lost['where']} at {first_lost['time_ms']:.1f} ms"
        )
    for node, seen in proposer_inflight.items():
        if isinstance(limit, int) and seen["in_flight"] >= limit:
            causes.append(
                f"a full window: when the request reached primary {node} at "
                f"{seen['time_ms']:.1f} ms it had {seen['in_flight']} batches in flight "
                f"(max_inflight_batches {limit})"
            )
    if submitted is not None and arrivals:
        timeout = settings.get("client_timeout_ms")
        resent = [
            item
            for item in arrivals
            if str(item["from"]).startswith("c")
            and isinstance(timeout, int | float)
            and item["time_ms"] - submitted["time_ms"] >= timeout
        ]
        if resent:
            causes.append(
                f"the client's retransmission: the request reached replicas again from "
                f"{resent[0]['time_ms']:.1f} ms (client_timeout_ms {timeout})"
            )
    if not causes:
        causes.append("nothing in the trace: no view change, lost message or full window")
    return causes


def render_payment(story: dict[str, Any]) -> str:
    lines = [f"payment {story['payment']}"]
    if not story["client_events"]:
        lines.append(
            f"  executed: {story['outcome']} (reason {story['reason']}); no client events in "
            "these files (replicas' logs), so no submission, receipt or latency"
        )
    elif story["decided_ms"] is None:
        lines.append("  never decided in this trace")
    else:
        lines.append(
            f"  {story['outcome']} (reason {story['reason']}) after {story['latency_ms']:.1f} ms"
            f" (typical in this run: {story['typical_latency_ms']:.1f} ms)"
            if story["typical_latency_ms"] is not None
            else f"  {story['outcome']} after {story['latency_ms']:.1f} ms"
        )
    lines.append("timeline")
    for item in story["timeline"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['node']:<4} {item['detail']}")
    if story["replies"]:
        replies = story["replies"]
        senders = ", ".join(sorted(dict.fromkeys(str(reply["from"]) for reply in replies)))
        lines.append(
            f"replies: {len(replies)} from {senders}, first at {replies[0]['time_ms']:.3f} ms"
        )
    lost = story["lost"]
    if lost["items"]:
        lines.append(f"dropped or lost messages about it: {sum(story['lost_by_reason'].values())}")
        for item in lost["items"]:
            seq = f" seq {item['seq']}" if item["seq"] is not None else ""
            lines.append(
                f"  {item['time_ms']:10.3f} ms  {item['message_type']}{seq} from {item['from']}"
                f" at {item['where']}: {item['reason']} ({item['by']})"
            )
        if lost["more"]:
            lines.append(f"  ... and {lost['more']} more")
    else:
        lines.append("dropped or lost messages about it: none")
    if story["slow"]:
        lines.append("slow: it waited on")
        lines.extend(f"  - {cause}" for cause in story["waited_on"])
    return "\n".join(lines)


# --- one view ---------------------------------------------------------------------------


def explain_view(paths: Sequence[str], view: int) -> dict[str, Any]:
    """Why view `view` began: suspicions and their timers, the evidence that fed them, the
    VIEW-CHANGEs and the NEW-VIEW's plan."""
    # Pass 1: when the first replica moved to this view, and when the previous one began.
    first_change: float | None = None
    previous_start = 0.0
    views_seen: dict[int, None] = {0: None}
    for event in iter_events(paths):
        if event["kind"] not in ("view_change", "new_view"):
            continue
        seen = _view_of(event)
        if seen is None:
            continue
        views_seen[seen] = None
        if event["kind"] == "view_change" and seen == view and first_change is None:
            first_change = event["time_ms"]
        if event["kind"] == "new_view" and seen < view and first_change is None:
            previous_start = event["time_ms"]
    if view == 0:
        raise ExplainError("view 0 is the first view: every replica starts in it")
    if first_change is None:
        known = ", ".join(str(seen) for seen in sorted(views_seen))
        raise ExplainError(f"view {view} never began in this trace (views: {known})")
    suspicions: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    installs: list[dict[str, Any]] = []
    plan: dict[str, Any] | None = None
    faults: list[dict[str, Any]] = []
    evidence = _Capped()
    drops: dict[str, Counter[str]] = {}
    first_drops: dict[tuple[str, str], dict[str, Any]] = {}
    view_change_messages: dict[str, dict[str, Any]] = {}
    suspect_messages = _Capped()
    for event in iter_events(paths):
        kind = event["kind"]
        at = event["time_ms"]
        node = event["node"]
        if at < previous_start:
            continue
        before = at <= first_change
        if kind == "suspect" and before:
            detail = str(event.get("detail", ""))
            reason = detail.split(": ", 1)[1] if ": " in detail else detail
            suspicions.append(
                {
                    **_line(event),
                    "suspected": f"r{event['primary_now']}" if "primary_now" in event else None,
                    "reason": reason,
                    "timer": TIMERS.get(reason, reason),
                }
            )
        elif kind == "deliver" and event.get("message_type") == "SUSPECT" and before:
            suspect_messages.add({"time_ms": at, "from": event.get("from"), "to": node})
        elif kind == "view_change" and _view_of(event) == view:
            changes.append(_line(event))
        elif (
            kind == "deliver"
            and event.get("message_type") == "VIEW_CHANGE"
            and event.get("view") == view
        ):
            sender = str(event.get("from"))
            view_change_messages.setdefault(sender, {"first_ms": at, "delivered": 0})
            view_change_messages[sender]["delivered"] += 1
        elif kind == "new_view" and _view_of(event) == view:
            installs.append(_line(event))
            if plan is None and "plan" in event:
                plan = {
                    "new_primary": event.get("new_primary"),
                    "view_changes_from": _ints(event.get("view_changes_from")),
                    "checkpoints": event.get("checkpoints"),
                    "entries": event.get("plan"),
                }
        elif kind == "fault" and before:
            faults.append(_line(event))
        elif kind == "evidence" and before:
            evidence.add(_line(event))
        elif kind in ("drop", "lost") and before:
            reason = str(event.get("reason") or str(event.get("detail", "")).split(" ")[0])
            if kind == "lost" and reason == "destination_down":
                continue  # the crash itself is listed among the faults
            counter = drops.setdefault(node, Counter())
            counter[reason] += 1
            message = _about(event)
            first_drops.setdefault(
                (node, reason),
                {
                    "time_ms": at,
                    "from": message.get("from"),
                    "message_type": message.get("message_type"),
                    "by": "network" if kind == "lost" else "replica",
                },
            )
    suspected = sorted(dict.fromkeys(item["suspected"] for item in suspicions if item["suspected"]))
    return {
        "view": view,
        "since_ms": previous_start,
        "first_view_change_ms": first_change,
        "suspected": suspected,
        "suspicions": suspicions[:MAX_LISTED],
        "suspect_messages": suspect_messages.json(),
        "faults": faults[:MAX_LISTED],
        "evidence": evidence.json(),
        "drops_before": {
            node: {
                reason: {"count": count, "first": first_drops[(node, reason)]}
                for reason, count in counter.most_common()
            }
            for node, counter in sorted(drops.items())
        },
        "view_changes": changes[:MAX_LISTED],
        "view_change_messages": dict(sorted(view_change_messages.items())),
        "installed": installs[:MAX_LISTED],
        "new_view_plan": plan,
    }


def render_view(story: dict[str, Any]) -> str:
    view = story["view"]
    lines = [
        f"view {view}: first replica moved at {story['first_view_change_ms']:.3f} ms "
        f"(looking back to {story['since_ms']:.3f} ms, when the view before began)"
    ]
    lines.append("why")
    if story["faults"]:
        for item in story["faults"]:
            lines.append(f"  {item['time_ms']:10.3f} ms  fault: {item['detail']}")
    for node, reasons in story["drops_before"].items():
        for reason, seen in reasons.items():
            first = seen["first"]
            lines.append(
                f"  {node} dropped {seen['count']} x {reason} ({first['by']}), first at "
                f"{first['time_ms']:.3f} ms: {first['message_type']} from {first['from']}"
            )
    for item in story["evidence"]["items"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['node']} evidence: {item['detail']}")
    if story["suspicions"]:
        for item in story["suspicions"]:
            lines.append(
                f"  {item['time_ms']:10.3f} ms  {item['node']} suspected primary "
                f"{item['suspected']}: {item['reason']} - {item['timer']}"
            )
    else:
        lines.append("  no replica suspected on its own timer: it followed f + 1 others' view")
    messages = story["suspect_messages"]
    if messages["items"]:
        senders = sorted(dict.fromkeys(str(item["from"]) for item in messages["items"]))
        lines.append(
            f"  SUSPECT messages from {', '.join(senders)} "
            f"({len(messages['items']) + messages['more']} delivered)"
        )
    lines.append("view changes")
    for item in story["view_changes"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['node']} moved {item['detail']}")
    for sender, seen in story["view_change_messages"].items():
        lines.append(
            f"  VIEW-CHANGE from {sender}: first delivered at {seen['first_ms']:.3f} ms, "
            f"{seen['delivered']} deliveries"
        )
    plan = story["new_view_plan"]
    lines.append("new view")
    for item in story["installed"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['node']} installed {item['detail']}")
    if plan is None:
        lines.append("  no replica installed it")
    else:
        lines.append(
            f"  NEW-VIEW by r{plan['new_primary']} on VIEW-CHANGEs from "
            f"{_names(plan['view_changes_from'])}; checkpoints they cited: "
            + ", ".join(f"r{sender} {seq}" for sender, seq in (plan["checkpoints"] or {}).items())
        )
        entries = plan["entries"] or []
        if not entries:
            lines.append("  plan: nothing to carry over")
        for entry in entries[:MAX_LISTED]:
            carried = entry.get("carried_from") or []
            source = f"prepared at {_names(carried)}" if carried else "a filler (none prepared)"
            payments = ", ".join(entry.get("payments") or []) or "no payments"
            lines.append(f"  plan: seq {entry.get('seq')} ({payments}) carried over, {source}")
        if len(entries) > MAX_LISTED:
            lines.append(f"  ... and {len(entries) - MAX_LISTED} more entries")
    return "\n".join(lines)


# --- one replica ------------------------------------------------------------------------


def explain_replica(paths: Sequence[str], replica: int) -> dict[str, Any]:
    """One replica's run: views, checkpoints, catch-ups, executions, drops by reason."""
    names = (f"r{replica}", f"r{replica}'")
    replicas_in_run: int | None = None
    seen = False
    views: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    catch_ups: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    notes = _Capped()
    executed = 0
    last_seq = 0
    drops: Counter[str] = Counter()
    first_drop: dict[str, dict[str, Any]] = {}
    lost: Counter[str] = Counter()
    first_lost: dict[str, dict[str, Any]] = {}
    for event in iter_events(paths):
        kind = event["kind"]
        node = event["node"]
        if kind == "settings" and isinstance(event.get("replicas"), int):
            replicas_in_run = event["replicas"]
        if kind == "fault" and re.search(rf"\br{replica}\b", str(event.get("detail", ""))):
            faults.append(_line(event))
        if node not in names:
            continue
        seen = True
        if kind in ("view_change", "new_view", "suspect"):
            views.append(_line(event))
        elif kind == "checkpoint_stable":
            checkpoints.append(_line(event))
        elif kind in ("state_transfer", "state_too_large"):
            catch_ups.append(_line(event))
        elif kind in ("evidence", "halt", "voting", "resume"):
            notes.add(_line(event))
        elif kind == "execute":
            executed += 1
            if isinstance(event.get("seq"), int):
                last_seq = max(last_seq, event["seq"])
        elif kind in ("drop", "lost"):
            reason = str(event.get("reason") or str(event.get("detail", "")).split(" ")[0])
            counter, first = (drops, first_drop) if kind == "drop" else (lost, first_lost)
            counter[reason] += 1
            if reason not in first:
                message = _about(event)
                first[reason] = {
                    "time_ms": event["time_ms"],
                    "detail": str(event.get("detail", "")),
                    "from": message.get("from"),
                    "message_type": message.get("message_type"),
                    "seq": message.get("seq"),
                }
    if not seen:
        if replicas_in_run is not None:
            raise ExplainError(
                f"replica {replica} is not in this trace (replicas 0..{replicas_in_run - 1})"
            )
        raise ExplainError(f"replica {replica} is not in this trace")
    final_view = 0
    for item in views:
        if item["kind"] == "new_view":
            found = _view_of(item)
            final_view = found if found is not None else final_view
    return {
        "replica": replica,
        "faults": faults[:MAX_LISTED],
        "views": views[:MAX_LISTED],
        "view_events": len(views),
        "final_view": final_view,
        "checkpoints": {
            "count": len(checkpoints),
            "first": checkpoints[0] if checkpoints else None,
            "last": checkpoints[-1] if checkpoints else None,
        },
        "catch_ups": catch_ups[:MAX_LISTED],
        "notes": notes.json(),
        "executed_batches": executed,
        "last_executed": last_seq,
        "drops": {
            reason: {"count": count, "first": first_drop[reason]}
            for reason, count in drops.most_common()
        },
        "lost_on_the_way": {
            reason: {"count": count, "first": first_lost[reason]}
            for reason, count in lost.most_common()
        },
    }


def render_replica(story: dict[str, Any]) -> str:
    replica = story["replica"]
    lines = [
        f"replica {replica}: executed {story['executed_batches']} batches, last seq "
        f"{story['last_executed']}, ended in view {story['final_view']}"
    ]
    for item in story["faults"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  fault: {item['detail']}")
    lines.append(f"views ({story['view_events']} events)")
    for item in story["views"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['kind']}: {item['detail']}")
    checkpoints = story["checkpoints"]
    if checkpoints["count"]:
        lines.append(
            f"checkpoints: {checkpoints['count']} stable, first {checkpoints['first']['detail']}"
            f" at {checkpoints['first']['time_ms']:.3f} ms, last {checkpoints['last']['detail']}"
            f" at {checkpoints['last']['time_ms']:.3f} ms"
        )
    else:
        lines.append("checkpoints: none became stable")
    lines.append(f"catch-ups: {len(story['catch_ups']) or 'none'}")
    for item in story["catch_ups"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['kind']}: {item['detail']}")
    for item in story["notes"]["items"]:
        lines.append(f"  {item['time_ms']:10.3f} ms  {item['kind']}: {item['detail']}")
    for title, table in (
        ("drops by reason (the replica refused them)", story["drops"]),
        ("lost on the way to it (network, crash, pause)", story["lost_on_the_way"]),
    ):
        lines.append(f"{title}: {'none' if not table else ''}".rstrip())
        for reason, seen in table.items():
            first = seen["first"]
            seq = f" seq {first['seq']}" if first["seq"] is not None else ""
            lines.append(
                f"  {reason:<28} {seen['count']:>6}  first at {first['time_ms']:.3f} ms: "
                f"{first['message_type']}{seq} from {first['from']}"
            )
    return "\n".join(lines)
