"""The cluster id: a SHA-256 hash of one cluster's genesis, named in every signed answer.

Two clusters can share replica keys (a test cluster re-created with other accounts, a
staging copy of production), so a signature alone does not say which cluster spoke.
Replies and balance replies carry the id inside the signed body, and receipts carry it
too: a receipt or a read from one cluster is never taken for another's.

The genesis is what every replica must agree on before the first request: the replica
public keys in id order (so n and f), the genesis accounts and the protocol parameters.
Host names, ports and client keys are deliberately left out: moving a replica or adding
a client is not a new cluster. Changing a protocol parameter is. Everything here is in
cluster.toml, so anyone holding that file can recompute the id offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import msgpack

from crypto.keys import KeyRing
from pbft.codec import pack
from pbft.config import ClusterConfig
from pbft.ledger import Account, GeneratedAccounts

CLUSTER_ID_BYTES = 32
# The default account names: acct-00000, acct-00001, ... for listed accounts (simulator
# workloads, `pbft cluster` files); generated genesis accounts take the same prefix and
# pad to the count's width (pbft.ledger.GeneratedAccounts).
ACCOUNT_PREFIX = "acct-"
# Domain separation: this hash can never coincide with a digest the protocol computes
# for another purpose (entries, batches, ledger states) over the same bytes.
_DOMAIN = b"pbft/v1/cluster-id\0"


def account_name(index: int) -> str:
    """The name of the index-th default account (five digits, more when needed)."""
    return f"{ACCOUNT_PREFIX}{index:05d}"


class GenesisError(ValueError):
    """The key ring does not hold a key for every replica the configuration names."""


def compute_cluster_id(
    config: ClusterConfig, keyring: KeyRing, accounts: Mapping[str, Account]
) -> bytes:
    """SHA-256 over a canonical msgpack encoding of the genesis, domain separated."""
    replica_keys = []
    for replica in config.replica_ids():
        key = keyring.get(("replica", replica))
        if key is None:
            raise GenesisError(f"the key ring holds no key for replica {replica}")
        replica_keys.append(key.public_bytes())
    # Effective values (watermark_window 0 means "the default"), keyed by field name.
    parameters = [
        [field.name, getattr(config, field.name)]
        for field in sorted(dataclasses.fields(config), key=lambda field: field.name)
    ]
    # msgpack of a 5-item array is its fixarray header and the items' encodings in a row,
    # so the account rows (a million for a large genesis) are encoded on their own, once
    # per genesis object however many replicas of one process ask.
    encoded = b"".join(
        [
            b"\x95",
            pack(config.replica_count),
            pack(config.fault_tolerance),
            pack(replica_keys),
            _packed_account_rows(accounts),
            pack(parameters),
        ]
    )
    return hashlib.sha256(_DOMAIN + encoded).digest()


def _packed_account_rows(accounts: Mapping[str, Account]) -> bytes:
    """[[name, owner, balance], ...] sorted by name, so the id does not depend on the order
    accounts were listed or inserted in."""
    if not isinstance(accounts, GeneratedAccounts):
        return pack(
            [[name, accounts[name].owner, accounts[name].balance] for name in sorted(accounts)]
        )
    cached = accounts.derived.get("cluster_id_rows")
    if cached is None:
        # The same bytes as pack() of the rows in name (= index) order: each row is a
        # 3-item array header, the name (its str header, the prefix, the zero-padded index)
        # and the owner's and balance's encodings; formatted straight into bytes, since a
        # row list and an Account per account would take seconds for a million.
        name = accounts.name(0).encode("utf-8")
        prefix = accounts.prefix.encode("utf-8")
        head = b"\x93" + pack(accounts.name(0))[: -len(name)] + prefix
        width = len(name) - len(prefix)
        balance = pack(accounts.balance)
        tails = [pack(owner) + balance for owner in accounts.owners]
        period = len(tails)
        rows = [
            b"%b%0*d%b" % (head, width, index, tails[index % period])
            for index in range(accounts.count)
        ]
        cached = msgpack.Packer().pack_array_header(accounts.count) + b"".join(rows)
        accounts.derived["cluster_id_rows"] = cached
    return cached
