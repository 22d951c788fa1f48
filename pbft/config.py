"""Cluster parameters shared by every replica and client of one cluster.

All durations are in milliseconds of the driver's clock (virtual time in the
simulator, monotonic time in the trio runtime); the core never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbft.holds import MAX_DURATION_MS, MAX_PER_CLIENT, LedgerLimits


class ConfigError(ValueError):
    """A cluster parameter is out of range; the message names the field."""


# The limits of a cluster, in one place: the wire format (pbft/messages.py), cluster files
# (runtime/cluster.py), scenarios (sim/scenario/) and the command line take them from here.
MIN_REPLICAS = 4  # f >= 1
MAX_REPLICAS = 256
MAX_BATCH_SIZE = 1024
MAX_BATCH_TIMEOUT_MS = 60_000
MAX_CHECKPOINT_INTERVAL = 4096
MAX_WATERMARK_WINDOW = 8192
MAX_CLOCK_SKEW_MS = 24 * 3600 * 1000

# The ledger's record limits have their defaults in one place, pbft/holds.py.
_LEDGER_DEFAULTS = LedgerLimits()


@dataclass(frozen=True)
class ClusterConfig:
    replica_count: int = 4
    # Requests per batch; a batch is also flushed once its oldest request waited this long.
    batch_size: int = 32
    batch_timeout_ms: int = 5
    # The primary keeps at most this many proposed batches unexecuted. Entries prepare one
    # after another (the chain rule), so more in flight only makes batches smaller; holding
    # back lets requests gather into fuller batches under load.
    max_inflight_batches: int = 4
    # Every checkpoint_interval sequence numbers the replicas agree on a state digest.
    checkpoint_interval: int = 16
    # The watermark window: the primary may run this far ahead of the last stable checkpoint.
    # Two checkpoint intervals, as in PBFT, so ordering never waits for a checkpoint to settle.
    watermark_window: int = 0
    view_change_timeout_ms: int = 300
    heartbeat_interval_ms: int = 50
    # Signed messages of a slot that has not moved for this long are sent again (lossy links).
    retransmit_interval_ms: int = 40
    # The view-change timeout doubles per failed view, up to this many doublings.
    max_timeout_doublings: int = 6
    # Limits that keep a replica's memory bounded whatever its peers and clients send.
    pending_request_limit: int = 8192
    # One client's share of the pending table: a client flooding signed requests fills its
    # own quota, not everyone's (and the primary orders what it holds well within a timeout).
    client_pending_limit: int = 128
    # Replays of decided requests and relays of pending ones, per client: an honest client
    # retransmits once per timeout, far below this.
    client_replay_rate_per_s: int = 50
    client_replay_burst: int = 100
    fetch_batch_limit: int = 32
    dedup_window: int = 4096
    # Client side: send to the primary, then to everyone after this long without a decision.
    client_timeout_ms: int = 400
    # State transfer: a chunk is at most this many ledger leaves (a power of two), cut to
    # halves while it is more than state_chunk_bytes.
    state_chunk_leaves: int = 16384
    state_chunk_bytes: int = 1024 * 1024
    # Catch-up service (commit certificates, state chunks) per requesting replica: a token
    # bucket of bytes, so a replica that keeps asking cannot make us stream without end.
    catch_up_bytes_per_second: int = 8 * 1024 * 1024
    catch_up_burst_bytes: int = 2 * 1024 * 1024
    # Batch timestamps: a backup accepts a fresh batch only if its timestamp is within this
    # of its own clock (pbft/ordering.py). Synced clocks differ by milliseconds; 30 s still
    # takes a badly synced replica or a paused VM. A lying primary moves an expiry by up to
    # twice this (review finding T2: it stamps one batch a bound behind the backups' clocks,
    # a later one a bound ahead), so 60 s with the default, still far below any sensible
    # hold lifetime (minutes to days). Not 15 s: the fuzzer's clock skews (sim/fuzz.py)
    # assume 30 s and lose liveness under 15 s. A replica whose clock is off by more
    # refuses every fresh batch: it counts against f.
    max_clock_skew_ms: int = 30_000

    # Issue 11's ledger records (pbft/holds.py says what they bound). Durations are batch
    # time, the only time execution knows.
    max_hold_duration_ms: int = _LEDGER_DEFAULTS.max_hold_duration_ms
    # Every record counts against one client, so a checkpoint holds at most clients x these
    # caps (pbft/checkpoint_size.py). With the defaults a client's records take at most
    # 300 KB (a hold or payment row with the longest names is under 580 bytes) next to its
    # 4096 decisions' 348 KB, so the 256 MiB a replica restores still takes about 400 clients
    # with full windows, twice the largest shipped scenario (200).
    # Holds, open or closed; at the cap the oldest closed one is forgotten early. 256 open
    # holds is far more than one buyer has pending; a shop's are counted on its customers.
    max_holds_per_client: int = _LEDGER_DEFAULTS.max_holds_per_client
    # 16 accounts a client may open: enough for a shop's tills, small in every checkpoint.
    max_accounts_per_client: int = _LEDGER_DEFAULTS.max_accounts_per_client
    # A captured, voided or expired hold's fate is kept this long (then hold_not_found).
    closed_hold_retention_ms: int = _LEDGER_DEFAULTS.closed_hold_retention_ms
    # A confirmed transfer or capture is refundable this long (0: no refunds)...
    refund_window_ms: int = _LEDGER_DEFAULTS.refund_window_ms
    # ... and only the client's latest this many (0: no refunds): at 500 payments/s the
    # window alone would keep 1.8 M. 256 covers a payer's payments of the last hour at
    # several a minute.
    max_refundable_per_client: int = _LEDGER_DEFAULTS.max_refundable_per_client

    def __post_init__(self) -> None:
        if self.watermark_window == 0:
            object.__setattr__(self, "watermark_window", 2 * self.checkpoint_interval)
        _require(
            MIN_REPLICAS <= self.replica_count <= MAX_REPLICAS,
            "replica_count",
            f"needs {MIN_REPLICAS} <= n <= {MAX_REPLICAS} (f >= 1)",
        )
        _require(
            1 <= self.batch_size <= MAX_BATCH_SIZE, "batch_size", f"must be in 1..{MAX_BATCH_SIZE}"
        )
        _require(
            0 <= self.batch_timeout_ms <= MAX_BATCH_TIMEOUT_MS,
            "batch_timeout_ms",
            f"must be in 0..{MAX_BATCH_TIMEOUT_MS}",
        )
        _require(
            1 <= self.max_inflight_batches <= 8192,
            "max_inflight_batches",
            "must be in 1..8192",
        )
        _require(
            1 <= self.checkpoint_interval <= MAX_CHECKPOINT_INTERVAL,
            "checkpoint_interval",
            f"must be in 1..{MAX_CHECKPOINT_INTERVAL}",
        )
        _require(
            self.checkpoint_interval <= self.watermark_window <= MAX_WATERMARK_WINDOW
            and self.watermark_window % self.checkpoint_interval == 0,
            "watermark_window",
            f"must be a multiple of checkpoint_interval, at most {MAX_WATERMARK_WINDOW}",
        )
        _require(
            10 <= self.view_change_timeout_ms <= 600_000,
            "view_change_timeout_ms",
            "must be in 10..600000",
        )
        _require(
            1 <= self.heartbeat_interval_ms < self.view_change_timeout_ms,
            "heartbeat_interval_ms",
            "must be at least 1 and below view_change_timeout_ms",
        )
        _require(
            1 <= self.retransmit_interval_ms <= 600_000,
            "retransmit_interval_ms",
            "must be in 1..600000",
        )
        _require(0 <= self.max_timeout_doublings <= 16, "max_timeout_doublings", "0..16")
        _require(1 <= self.pending_request_limit <= 1_000_000, "pending_request_limit", "1..1e6")
        _require(
            1 <= self.client_pending_limit <= self.pending_request_limit,
            "client_pending_limit",
            "must be in 1..pending_request_limit",
        )
        _require(
            1 <= self.client_replay_rate_per_s <= 1_000_000,
            "client_replay_rate_per_s",
            "must be in 1..1000000",
        )
        _require(1 <= self.client_replay_burst <= 1_000_000, "client_replay_burst", "1..1e6")
        _require(1 <= self.fetch_batch_limit <= 1024, "fetch_batch_limit", "must be in 1..1024")
        _require(1 <= self.dedup_window <= 1_000_000, "dedup_window", "must be in 1..1000000")
        _require(10 <= self.client_timeout_ms <= 600_000, "client_timeout_ms", "10..600000")
        _require(
            1 <= self.state_chunk_leaves <= 65536
            and self.state_chunk_leaves & (self.state_chunk_leaves - 1) == 0,
            "state_chunk_leaves",
            "must be a power of two in 1..65536",
        )
        _require(
            1024 <= self.state_chunk_bytes <= 8 * 1024 * 1024,
            "state_chunk_bytes",
            "must be in 1024..8388608",
        )
        _require(
            1024 <= self.catch_up_bytes_per_second <= 2**30,
            "catch_up_bytes_per_second",
            "must be in 1024..2**30",
        )
        _require(
            1024 <= self.catch_up_burst_bytes <= 2**30,
            "catch_up_burst_bytes",
            "must be in 1024..2**30",
        )
        _require(
            1 <= self.max_hold_duration_ms <= MAX_DURATION_MS,
            "max_hold_duration_ms",
            f"must be in 1..{MAX_DURATION_MS}",
        )
        for name in (
            "max_holds_per_client",
            "max_accounts_per_client",
            "max_refundable_per_client",
        ):
            _require(0 <= getattr(self, name) <= MAX_PER_CLIENT, name, f"0..{MAX_PER_CLIENT}")
        for name in ("closed_hold_retention_ms", "refund_window_ms"):
            _require(0 <= getattr(self, name) <= MAX_DURATION_MS, name, f"0..{MAX_DURATION_MS}")
        _require(
            1 <= self.max_clock_skew_ms <= MAX_CLOCK_SKEW_MS,
            "max_clock_skew_ms",
            f"must be in 1..{MAX_CLOCK_SKEW_MS}",
        )

    def ledger_limits(self) -> LedgerLimits:
        """The bounds the ledger's records keep to (part of every replica's genesis)."""
        return LedgerLimits(
            self.max_hold_duration_ms,
            self.max_holds_per_client,
            self.max_accounts_per_client,
            self.closed_hold_retention_ms,
            self.refund_window_ms,
            self.max_refundable_per_client,
        )

    # Every threshold the protocol uses comes from the four properties below, and they hold
    # for any n >= 4, not only n = 3f + 1. Two quorums of q = ceil((n + f + 1) / 2) replicas
    # overlap in 2q - n >= f + 1 replicas, so in at least one correct replica; and q <= n - f,
    # so the correct replicas alone can always form one. For n = 3f + 1, q = 2f + 1 as in
    # PBFT; for n = 5 (f = 1) q = 4, where 2f + 1 = 3 would let two quorums of 3 meet only
    # in the one Byzantine replica.

    @property
    def fault_tolerance(self) -> int:
        """f: how many replicas may be Byzantine at once."""
        return fault_tolerance_of(self.replica_count)

    @property
    def quorum(self) -> int:
        """ceil((n + f + 1) / 2): any two quorums share at least one correct replica.

        Certificates (commit, checkpoint), the view changes a NEW-VIEW cites, and the view
        changes that arm the view-change timer all take this many distinct replicas."""
        return quorum_size(self.replica_count)

    @property
    def prepare_quorum(self) -> int:
        """Prepares (from backups) that, with the primary's pre-prepare, make a quorum."""
        return self.quorum - 1

    @property
    def weak_quorum(self) -> int:
        """f + 1: at least one of them is correct (receipts, catch-up hints, suspicion)."""
        return self.fault_tolerance + 1

    def primary_of(self, view: int) -> int:
        return view % self.replica_count

    def replica_ids(self) -> range:
        return range(self.replica_count)


def fault_tolerance_of(replica_count: int) -> int:
    """f for a cluster of n replicas: the most Byzantine replicas n can tolerate."""
    return (replica_count - 1) // 3


def quorum_size(replica_count: int) -> int:
    """ceil((n + f + 1) / 2) for a cluster of n replicas (see ClusterConfig.quorum)."""
    f = fault_tolerance_of(replica_count)
    return (replica_count + f + 2) // 2


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {problem}")
