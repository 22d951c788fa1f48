"""Trace events for `pbft explain`: the fields a driver (the simulator, a replica process)
writes next to its events, built in one place so every trace reads alike (the README's
"Trace events" table). Pure functions of the bytes and actions they are given."""

from __future__ import annotations

from collections.abc import Sequence

from pbft.chain import entry_digest
from pbft.codec import DecodeError, unpack
from pbft.config import ClusterConfig
from pbft.events import Executed, Persist
from pbft.messages import (
    Commit,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
)
from pbft.signed import Rejected, peek


def settings_fields(config: ClusterConfig) -> dict[str, object]:
    """The protocol settings a `settings` event carries (`pbft explain` reads its timers and
    quorums from them), the same from the simulator and from a replica process."""
    return {
        "replicas": config.replica_count,
        "quorum": config.quorum,
        "prepare_quorum": config.prepare_quorum,
        "batch_size": config.batch_size,
        "batch_timeout_ms": config.batch_timeout_ms,
        "max_inflight_batches": config.max_inflight_batches,
        "watermark_window": config.watermark_window,
        "checkpoint_interval": config.checkpoint_interval,
        "view_change_timeout_ms": config.view_change_timeout_ms,
        "client_timeout_ms": config.client_timeout_ms,
    }


def message_fields(sender: str, data: bytes) -> dict[str, object]:
    """Who sent what, and which payment, view and seq it is about, where it says."""
    fields: dict[str, object] = {"from": sender}
    try:
        _, message = peek(data)
    except Rejected:
        fields["message_type"] = "MALFORMED"
        return fields
    fields["message_type"] = message.TYPE.name
    if isinstance(message, Request | Reply):
        fields["payment"] = f"{message.client_id}:{message.request_id}"
    for name in ("view", "seq"):
        if hasattr(message, name):
            fields[name] = getattr(message, name)
    if isinstance(message, ViewChange):
        fields["view"] = message.new_view
    return fields


def request_ids(requests: Sequence[bytes]) -> list[str]:
    """Each request of a batch as "CLIENT:REQUEST", for the trace file."""
    ids = []
    for raw in requests:
        try:
            request = peek(raw)[1]
        except Rejected:
            continue
        if isinstance(request, Request):
            ids.append(f"{request.client_id}:{request.request_id}")
    return ids


def new_view_fields(raw: bytes) -> dict[str, object]:
    """A NEW-VIEW's plan for the trace file: the VIEW-CHANGEs it rests on, and for each
    re-proposed seq the replicas whose VIEW-CHANGE carried it prepared (none: a filler)."""
    try:
        message = peek(raw, NewView)[1]
    except Rejected:
        return {}
    if not isinstance(message, NewView):
        return {}
    carried: dict[tuple[int, bytes], list[int]] = {}
    senders = []
    checkpoints = {}
    for view_change_raw in message.view_changes:
        try:
            view_change = peek(view_change_raw, ViewChange)[1]
        except Rejected:
            continue
        if not isinstance(view_change, ViewChange):
            continue
        senders.append(view_change.replica)
        checkpoints[str(view_change.replica)] = view_change.checkpoint_seq
        for certificate in view_change.prepared:
            try:
                prepared = peek(certificate.pre_prepare, PrePrepare)[1]
            except Rejected:
                continue
            if isinstance(prepared, PrePrepare):
                key = (prepared.seq, _entry_of(prepared))
                carried.setdefault(key, []).append(view_change.replica)
    plan = []
    for pre_prepare_raw in message.pre_prepares:
        try:
            proposal = peek(pre_prepare_raw, PrePrepare)[1]
        except Rejected:
            continue
        if isinstance(proposal, PrePrepare):
            plan.append(
                {
                    "seq": proposal.seq,
                    "payments": request_ids(proposal.requests),
                    "carried_from": sorted(carried.get((proposal.seq, _entry_of(proposal)), [])),
                }
            )
    return {
        "view": message.view,
        "new_primary": message.replica,
        "view_changes_from": sorted(senders),
        "checkpoints": checkpoints,
        "plan": plan,
    }


def _entry_of(proposal: PrePrepare) -> bytes:
    return entry_digest(
        proposal.seq, proposal.prev_hash, proposal.batch_digest, proposal.timestamp_ms
    )


def proposal_event(data: bytes) -> tuple[str, dict[str, object]] | None:
    """A PRE-PREPARE the primary sends: (detail, fields) of its `propose` event."""
    try:
        proposal = peek(data, PrePrepare)[1]
    except Rejected:
        return None
    if not isinstance(proposal, PrePrepare):
        return None
    return (
        f"view {proposal.view} seq {proposal.seq}",
        {"view": proposal.view, "seq": proposal.seq, "payments": request_ids(proposal.requests)},
    )


def certificate_events(records: Sequence[Persist]) -> list[tuple[str, str, dict[str, object]]]:
    """The prepared and commit certificates among a replica's records, as (kind, detail,
    fields) of `prepared` / `committed` events: when, and who signed."""
    events: list[tuple[str, str, dict[str, object]]] = []
    for record in records:
        kind = record.key[0]
        if record.value is None or kind not in ("prepared", "committed"):
            continue
        try:
            if kind == "prepared":
                view, wire = unpack(record.value)
                certificate = PreparedCertificate.from_wire(wire)
                pre_prepare, votes = certificate.pre_prepare, certificate.prepares
            else:
                pre_prepare, votes = unpack(record.value)
                view = None
            proposal = peek(pre_prepare, PrePrepare)[1]
            signers = [peek(vote, (Prepare, Commit))[1] for vote in votes]
        except (Rejected, DecodeError, ValueError, TypeError):
            continue
        if not isinstance(proposal, PrePrepare):
            continue
        replicas = sorted(
            dict.fromkeys(
                signer.replica for signer in signers if isinstance(signer, Prepare | Commit)
            )
        )
        if kind == "prepared":
            # The primary's PRE-PREPARE stands for its prepare.
            replicas = sorted(dict.fromkeys([proposal.replica, *replicas]))
        seen_view = view if isinstance(view, int) else proposal.view
        events.append(
            (
                kind,
                f"seq {proposal.seq} view {seen_view} signers {replicas}",
                {
                    "seq": proposal.seq,
                    "view": seen_view,
                    "signers": replicas,
                    "payments": request_ids(proposal.requests),
                },
            )
        )
    return events


def execute_fields(executed: Executed) -> dict[str, object]:
    """An executed batch's fields: where it ran, and each request's outcome and reason."""
    return {
        "seq": executed.seq,
        "view": executed.view,
        "primary": executed.primary,
        "payments": [
            f"{record.client_id}:{record.request_id}:{record.outcome}"
            for record in executed.requests
        ],
        "results": [
            {
                "payment": f"{record.client_id}:{record.request_id}",
                "op": record.op,
                "outcome": record.outcome,
                "reason": record.reason,
                "fresh": record.fresh,
            }
            for record in executed.requests
        ],
    }
