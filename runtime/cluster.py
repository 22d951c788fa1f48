"""Cluster files: who the replicas and clients are, where replicas listen, the genesis ledger.

`DIR/cluster.toml` (written by `pbft keygen`, read by every other command):

```toml
f = 1                          # must equal (replicas - 1) // 3

[protocol]                     # optional: pbft.config.ClusterConfig fields
batch_size = 32

[transport]                    # optional: how much one client may send each replica
client_frames_per_s = 400      # beyond a burst, a client's frames wait (runtime/inbound.py)
client_frame_burst = 400

[history]                      # optional: each replica's lookup history (local, not protocol)
retention_seqs = 100000        # newest seqs kept in history-<id>.sqlite: >= 100000 requests,
                               # <= about 1.2 GB at batch_size 32 (~380 bytes a transfer)

[[replicas]]
id = 0
host = "127.0.0.1"
port = 7000
public_key = "<64 hex digits>"

[[clients]]
id = 0
public_key = "<64 hex digits>"

[[accounts]]
name = "acct-00000"
owner = 0                      # the client id that may debit it
balance = 100000               # integer minor units
```

Instead of `[[accounts]]`, a large genesis is described by a rule (pbft.ledger.GeneratedAccounts):

```toml
[genesis]
generated_accounts = 1000000   # acct-000000 .. acct-999999
balance = 1000                 # each
prefix = "acct-"               # optional, this is the default
```

Account i is owned by the i-th client in id order, round-robin.

Private keys live beside it, one PEM file per principal (`replica-0.key`,
`client-0.key`), mode 0600. Replica ids are 0..n-1 and client ids 0..m-1, each once.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from crypto.keyfiles import KeyFileError, load_private_key, save_private_key
from crypto.keys import KeyFormatError, KeyRing, SigningKey, VerifyKey
from pbft.checkpoint_size import checkpoint_size_problem
from pbft.config import MAX_REPLICAS, MIN_REPLICAS, ClusterConfig, ConfigError
from pbft.genesis import ACCOUNT_PREFIX, account_name, compute_cluster_id
from pbft.history import DEFAULT_RETENTION_SEQS
from pbft.ledger import (
    MAX_ACCOUNT_NAME_LENGTH,
    MAX_AMOUNT,
    MAX_TOTAL,
    Account,
    GeneratedAccounts,
)
from runtime.storage import MAX_VALUE_BYTES
from runtime.transport import TransportConfig

CLUSTER_FILE_NAME = "cluster.toml"
MAX_CLIENTS = 100_000
MAX_ACCOUNTS = 1_000_000
MAX_GENERATED_ACCOUNTS = 10_000_000
_TOP_KEYS = (
    "f",
    "protocol",
    "transport",
    "history",
    "replicas",
    "clients",
    "accounts",
    "genesis",
)
_HISTORY_KEYS = ("retention_seqs",)
# A billion seqs: years of batches at any rate this runtime reaches; beyond it is a typo.
MAX_HISTORY_RETENTION_SEQS = 1_000_000_000
_TRANSPORT_KEYS = ("client_frames_per_s", "client_frame_burst")
# A ceiling that still bounds what one client can cost a replica (about a core's worth of
# signature checks): a pace above it is a typo, not a policy.
MAX_CLIENT_FRAMES_PER_S = 100_000
_GENESIS_KEYS = ("generated_accounts", "balance", "prefix")
_REPLICA_KEYS = ("id", "host", "port", "public_key")
_CLIENT_KEYS = ("id", "public_key")
_ACCOUNT_KEYS = ("name", "owner", "balance")
_PROTOCOL_KEYS = tuple(
    field.name for field in dataclasses.fields(ClusterConfig) if field.name != "replica_count"
)


class ClusterFileError(ValueError):
    """The cluster file cannot be used; the message names the file, the field and the problem."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(f"{path}: {field}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class ReplicaAddress:
    replica_id: int
    host: str
    port: int
    public_key: VerifyKey


@dataclass(frozen=True)
class Cluster:
    path: Path
    config: ClusterConfig
    replicas: tuple[ReplicaAddress, ...]
    client_keys: dict[int, VerifyKey]
    accounts: Mapping[str, Account]
    # [transport]: one client's pace at each replica (TransportConfig.client_inbound_*).
    client_frames_per_s: int = int(TransportConfig.client_inbound_rate)
    client_frame_burst: int = TransportConfig.client_inbound_burst
    # [history]: how many of the newest seqs each replica keeps for lookups
    # (runtime/history_store.py). Local policy, not part of the cluster id.
    history_retention_seqs: int = DEFAULT_RETENTION_SEQS

    def transport_config(self) -> TransportConfig:
        """The transport limits a replica of this cluster runs with."""
        return TransportConfig(
            client_inbound_rate=float(self.client_frames_per_s),
            client_inbound_burst=self.client_frame_burst,
        )

    @property
    def directory(self) -> Path:
        return self.path.parent

    def keyring(self) -> KeyRing:
        ring = KeyRing()
        for replica in self.replicas:
            ring.add(("replica", replica.replica_id), replica.public_key)
        for client_id, key in sorted(self.client_keys.items()):
            ring.add(("client", client_id), key)
        return ring

    @property
    def cluster_id(self) -> bytes:
        """The genesis hash every reply and receipt of this cluster names (pbft/genesis.py)."""
        return compute_cluster_id(self.config, self.keyring(), self.accounts)

    def replica(self, replica_id: int) -> ReplicaAddress:
        for replica in self.replicas:
            if replica.replica_id == replica_id:
                return replica
        raise ClusterFileError(str(self.path), "replicas", f"no replica with id {replica_id}")

    def private_key_path(self, role: str, principal_id: int) -> Path:
        return self.directory / f"{role}-{principal_id}.key"

    def load_private_key(self, role: str, principal_id: int) -> SigningKey:
        path = self.private_key_path(role, principal_id)
        try:
            key = load_private_key(path)
        except KeyFileError as error:
            raise ClusterFileError(str(path), "private key", str(error)) from None
        expected = (
            self.replica(principal_id).public_key
            if role == "replica"
            else self.client_keys.get(principal_id)
        )
        if expected is None:
            raise ClusterFileError(str(self.path), "clients", f"no client with id {principal_id}")
        if key.verify_key != expected:
            raise ClusterFileError(
                str(path), "private key", f"does not match {role} {principal_id}'s public key"
            )
        return key


def load_cluster(path: str | os.PathLike[str]) -> Cluster:
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise ClusterFileError(source, "file", f"cannot read: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ClusterFileError(source, "file", f"invalid TOML: {error}") from None
    return _parse(document, Path(source))


def _parse(document: dict[str, Any], path: Path) -> Cluster:
    source = str(path)

    def fail(field: str, problem: str) -> ClusterFileError:
        return ClusterFileError(source, field, problem)

    def known(table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise fail(where or "file", "expected a table")
        for key in table:
            if key not in allowed:
                raise fail(f"{where}.{key}" if where else key, "unknown field")
        return table

    def integer(value: Any, field: str, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise fail(field, f"expected an integer in {low}..{high}, got {value!r}")
        return value

    def text(value: Any, field: str, longest: int = 255) -> str:
        if not isinstance(value, str) or not value or len(value) > longest:
            raise fail(field, f"expected a non-empty string of at most {longest} characters")
        return value

    # Each public key names one principal: a key shared by a replica and a client would let
    # one private key sign as both (its client requests would pass as the replica's).
    key_fields: dict[VerifyKey, str] = {}

    def public_key(value: Any, field: str) -> VerifyKey:
        try:
            key = VerifyKey.from_hex(text(value, field))
        except KeyFormatError as error:
            raise fail(field, str(error)) from None
        other = key_fields.setdefault(key, field)
        if other != field:
            raise fail(field, f"the same public key as {other}; every principal needs its own")
        return key

    def array(key: str, most: int) -> list[Any]:
        value = document.get(key, [])
        if not isinstance(value, list) or len(value) > most:
            raise fail(key, f"expected an array of at most {most} tables")
        return value

    def generated(table: dict[str, Any]) -> Mapping[str, Account]:
        for key in ("generated_accounts", "balance"):
            if key not in table:
                raise fail(f"genesis.{key}", "missing")
        count = integer(
            table["generated_accounts"], "genesis.generated_accounts", 1, MAX_GENERATED_ACCOUNTS
        )
        balance = integer(table["balance"], "genesis.balance", 0, MAX_AMOUNT)
        prefix = table.get("prefix", ACCOUNT_PREFIX)
        if (
            not isinstance(prefix, str)
            or len(prefix) + len(str(count - 1)) > MAX_ACCOUNT_NAME_LENGTH
        ):
            raise fail("genesis.prefix", "expected a string; names must stay within 64 chars")
        if not client_keys:
            raise fail("genesis", "generated accounts need at least one client to own them")
        try:
            return GeneratedAccounts(count, balance, prefix, sorted(client_keys))
        except ValueError as error:
            raise fail("genesis", str(error)) from None

    known(document, _TOP_KEYS, "")
    replicas = []
    for index, table in enumerate(array("replicas", MAX_REPLICAS)):
        where = f"replicas[{index}]"
        known(table, _REPLICA_KEYS, where)
        for key in _REPLICA_KEYS:
            if key not in table:
                raise fail(f"{where}.{key}", "missing")
        replica_id = integer(table["id"], f"{where}.id", 0, MAX_REPLICAS - 1)
        if replica_id != index:
            raise fail(
                f"{where}.id", f"replicas must be listed in id order 0..n-1, got {replica_id}"
            )
        replicas.append(
            ReplicaAddress(
                replica_id,
                text(table["host"], f"{where}.host"),
                integer(table["port"], f"{where}.port", 1, 65535),
                public_key(table["public_key"], f"{where}.public_key"),
            )
        )
    if len(replicas) < 4:
        raise fail(
            "replicas", f"needs at least 4 replicas (n = 3f + 1, f >= 1), got {len(replicas)}"
        )
    f = integer(document.get("f", (len(replicas) - 1) // 3), "f", 1, MAX_REPLICAS)
    if f != (len(replicas) - 1) // 3:
        raise fail("f", f"{len(replicas)} replicas tolerate f = {(len(replicas) - 1) // 3}")
    client_keys: dict[int, VerifyKey] = {}
    for index, table in enumerate(array("clients", MAX_CLIENTS)):
        where = f"clients[{index}]"
        known(table, _CLIENT_KEYS, where)
        if "id" not in table or "public_key" not in table:
            raise fail(where, "needs id and public_key")
        client_id = integer(table["id"], f"{where}.id", 0, 2**32 - 1)
        if client_id in client_keys:
            raise fail(f"{where}.id", f"client {client_id} listed twice")
        client_keys[client_id] = public_key(table["public_key"], f"{where}.public_key")
    accounts: dict[str, Account] = {}
    for index, table in enumerate(array("accounts", MAX_ACCOUNTS)):
        where = f"accounts[{index}]"
        known(table, _ACCOUNT_KEYS, where)
        for key in _ACCOUNT_KEYS:
            if key not in table:
                raise fail(f"{where}.{key}", "missing")
        name = text(table["name"], f"{where}.name", 64)
        if name in accounts:
            raise fail(f"{where}.name", f"account {name!r} listed twice")
        owner = integer(table["owner"], f"{where}.owner", 0, 2**32 - 1)
        if owner not in client_keys:
            raise fail(f"{where}.owner", f"no client with id {owner}")
        accounts[name] = Account(
            owner, integer(table["balance"], f"{where}.balance", 0, MAX_AMOUNT)
        )
    if "genesis" in document:
        if accounts:
            raise fail("genesis", "give [[accounts]] or [genesis], not both")
        accounts = generated(known(document["genesis"], _GENESIS_KEYS, "genesis"))
    protocol = known(document.get("protocol", {}), _PROTOCOL_KEYS, "protocol")
    try:
        config = ClusterConfig(replica_count=len(replicas), **protocol)
    except (ConfigError, TypeError) as error:
        raise fail("protocol", str(error)) from None
    # Here, so that `pbft replica` and `pbft cluster up` refuse before anything starts: a
    # checkpoint a replica cannot store would stop every replica at once (issue 8, point 7).
    problem = checkpoint_size_problem(config, accounts, len(client_keys), MAX_VALUE_BYTES)
    if problem is not None:
        raise fail("checkpoint size", problem)
    transport = known(document.get("transport", {}), _TRANSPORT_KEYS, "transport")
    pace = integer(
        transport.get("client_frames_per_s", Cluster.client_frames_per_s),
        "transport.client_frames_per_s",
        1,
        MAX_CLIENT_FRAMES_PER_S,
    )
    burst = integer(
        transport.get("client_frame_burst", Cluster.client_frame_burst),
        "transport.client_frame_burst",
        1,
        MAX_CLIENT_FRAMES_PER_S,
    )
    history = known(document.get("history", {}), _HISTORY_KEYS, "history")
    retention = integer(
        history.get("retention_seqs", DEFAULT_RETENTION_SEQS),
        "history.retention_seqs",
        1,
        MAX_HISTORY_RETENTION_SEQS,
    )
    return Cluster(path, config, tuple(replicas), client_keys, accounts, pace, burst, retention)


def _cluster_toml(document: Mapping[str, Any]) -> str:
    """The cluster file's text: values rendered by tomli-w, laid out as the module docstring
    shows, one [table] or [[array-of-tables]] block each (tomli-w alone would write short
    arrays of tables inline, before the long ones). The tables here are flat."""
    blocks = [tomli_w.dumps({key: value for key, value in document.items() if key == "f"})]
    for key, value in document.items():
        if isinstance(value, Mapping):
            blocks.append(f"[{key}]\n" + tomli_w.dumps(value))
        elif isinstance(value, list):
            blocks.extend(f"[[{key}]]\n" + tomli_w.dumps(table) for table in value)
    return "\n".join(blocks)


def write_cluster(
    directory: str | os.PathLike[str],
    *,
    replicas: int,
    clients: int,
    host: str = "127.0.0.1",
    base_port: int = 7000,
    accounts_per_client: int = 2,
    initial_balance: int = 100_000,
    protocol: dict[str, int] | None = None,
    generated_accounts: int | None = None,
) -> Path:
    """Generate keys and write DIR/cluster.toml plus one private key file per principal.

    With `generated_accounts`, the genesis is that many accounts of `initial_balance` by
    rule ([genesis]) instead of `accounts_per_client` listed ones.

    Refuses to overwrite an existing cluster: keys are identities, not scratch files.
    """
    if not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
        raise ValueError(f"--replicas must be in {MIN_REPLICAS}..{MAX_REPLICAS}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 <= initial_balance <= MAX_AMOUNT:
        raise ValueError("--initial-balance out of range")
    if generated_accounts is not None:
        if not 1 <= generated_accounts <= MAX_GENERATED_ACCOUNTS:
            raise ValueError(f"--generated-accounts must be in 1..{MAX_GENERATED_ACCOUNTS}")
        if generated_accounts * initial_balance > MAX_TOTAL:
            raise ValueError("--generated-accounts x --initial-balance exceeds the money limit")
    # Before any key is made: a cluster whose checkpoint cannot be stored is never written.
    try:
        config = ClusterConfig(replica_count=replicas, **(protocol or {}))
    except (ConfigError, TypeError) as error:
        raise ValueError(f"protocol: {error}") from None
    genesis: Mapping[str, Account] = (
        GeneratedAccounts(generated_accounts, initial_balance, ACCOUNT_PREFIX, range(clients))
        if generated_accounts is not None
        else {
            account_name(index): Account(0, initial_balance)
            for index in range(clients * accounts_per_client)
        }
    )
    problem = checkpoint_size_problem(config, genesis, clients, MAX_VALUE_BYTES)
    if problem is not None:
        raise ValueError(problem)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / CLUSTER_FILE_NAME
    if path.exists():
        raise FileExistsError(f"{path} exists: refusing to replace a cluster's identities")
    document: dict[str, Any] = {"f": (replicas - 1) // 3}
    if protocol:
        document["protocol"] = dict(sorted(protocol.items()))
    document["replicas"] = []
    for replica_id in range(replicas):
        key = SigningKey.generate()
        save_private_key(root / f"replica-{replica_id}.key", key)
        document["replicas"].append(
            {
                "id": replica_id,
                "host": host,
                "port": base_port + replica_id,
                "public_key": key.verify_key.hex(),
            }
        )
    document["clients"] = []
    for client_id in range(clients):
        key = SigningKey.generate()
        save_private_key(root / f"client-{client_id}.key", key)
        document["clients"].append({"id": client_id, "public_key": key.verify_key.hex()})
    if generated_accounts is not None:
        document["genesis"] = {"generated_accounts": generated_accounts, "balance": initial_balance}
        accounts_per_client = 0
    accounts = [
        {
            "name": account_name(index),
            "owner": index // accounts_per_client,
            "balance": initial_balance,
        }
        for index in range(clients * accounts_per_client)
    ]
    if accounts:
        document["accounts"] = accounts
    temporary = path.with_suffix(".tmp")
    temporary.write_text(_cluster_toml(document))
    os.replace(temporary, path)
    load_cluster(path)  # what we wrote must read back
    return path
