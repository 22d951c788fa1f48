"""Why the replica or client core dropped an untrusted input: the reasons counted in
`drops`, named in `Note(kind=drop)` and in the runtime's logs and metrics.

A StrEnum, so each reason is still the string it always was (trace lines, counters
and dashboards are unchanged). Two families are derived rather than listed: a frame
that does not decode drops as `malformed_<codec reason>` (pbft/signed.py), and a batch
holding such a request as `batch_request_<that reason>` (pbft/certificates.py).
"""

from __future__ import annotations

from enum import StrEnum


class DropReason(StrEnum):
    # Envelope and signature (pbft/signed.py).
    UNKNOWN_VERSION = "unknown_version"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_SENDER = "unknown_sender"
    SENDER_MISMATCH = "sender_mismatch"
    BAD_SIGNATURE = "bad_signature"
    NOT_FOR_US = "not_for_us"
    OVERSIZE = "oversize"
    OUT_OF_RANGE = "out_of_range"
    # Intake (the replica's dispatch).
    HALTED = "halted"
    FROM_SELF = "from_self"
    UNEXPECTED_TYPE = "unexpected_type"
    STALE = "stale"
    REDUNDANT_VOTE = "redundant_vote"
    # Client requests.
    CLIENT_QUOTA_FULL = "client_quota_full"
    REQUEST_QUEUE_FULL = "request_queue_full"
    REPLAY_RATE_LIMITED = "replay_rate_limited"
    RELAY_RATE_LIMITED = "relay_rate_limited"
    # Lookups of history (pbft/lookups.py).
    LOOKUP_RATE_LIMITED = "lookup_rate_limited"
    BAD_LOOKUP = "bad_lookup"
    # Ordering: views, the window, proposals and votes.
    WRONG_VIEW = "wrong_view"
    NOT_PRIMARY = "not_primary"
    BELOW_WINDOW = "below_window"
    ABOVE_WINDOW = "above_window"
    CONFLICTING_PRE_PREPARE = "conflicting_pre_prepare"
    NOT_THE_NEW_VIEW_PRE_PREPARE = "not_the_new_view_pre_prepare"
    CONFLICTS_WITH_COMMITTED = "conflicts_with_committed"
    CONFLICTS_WITH_OWN_VOTE = "conflicts_with_own_vote"
    BAD_CHAIN = "bad_chain"
    # A batch timestamp out of order with its neighbours or too far from our clock.
    BAD_TIMESTAMP = "bad_timestamp"
    PRIMARY_PREPARE = "primary_prepare"
    CONFLICTING_VOTE = "conflicting_vote"
    # Certificates and batches (pbft/certificates.py).
    BAD_CERTIFICATE = "bad_certificate"
    BAD_BATCH_DIGEST = "bad_batch_digest"
    BATCH_TOO_LARGE = "batch_too_large"
    BATCH_DUPLICATE_REQUEST = "batch_duplicate_request"
    BAD_CHECKPOINT_PROOF = "bad_checkpoint_proof"
    # Checkpoints, view change.
    BAD_CHECKPOINT = "bad_checkpoint"
    BAD_VIEW_CHANGE = "bad_view_change"
    BAD_NEW_VIEW = "bad_new_view"
    # Catch-up and state transfer (pbft/statetransfer.py).
    CATCH_UP_BUDGET_EXCEEDED = "catch_up_budget_exceeded"
    STATE_TOO_LARGE_TO_SEND = "state_too_large_to_send"
    STATE_REQUEST_AHEAD = "state_request_ahead"
    BAD_STATE_REQUEST = "bad_state_request"
    STATE_CHUNK_UNEXPECTED = "state_chunk_unexpected"
    STATE_CHUNK_CONFLICT = "state_chunk_conflict"
    BAD_STATE_CHUNK = "bad_state_chunk"
    BAD_SNAPSHOT = "bad_snapshot"
    # Replies, at a client (pbft/client.py).
    LATE_REPLY = "late_reply"
    CONFLICTING_REPLY = "conflicting_reply"
    REPLY_FOR_OTHER_BODY = "reply_for_other_body"
    OTHER_CLUSTER = "other_cluster"
    # Its result is not under the root it carries (or the proof is malformed or too long).
    BAD_REPLY_PROOF = "bad_reply_proof"
