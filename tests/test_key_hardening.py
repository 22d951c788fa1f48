"""Public keys that prove nothing are refused wherever a key is loaded, and one public key
serves one principal only (issue 8, point 8)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from crypto.keyfiles import KeyFileError, load_public_key
from crypto.keys import (
    DuplicateKeyError,
    KeyFormatError,
    KeyRing,
    SigningKey,
    VerifyKey,
    public_key_problem,
)
from crypto.signing import signing_input
from runtime.cluster import ClusterFileError, load_cluster, write_cluster

P = 2**255 - 19
ORDER_8 = "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"
SMALL_ORDER = {
    "identity (order 1)": (1).to_bytes(32, "little").hex(),
    "y = -1 (order 2)": (P - 1).to_bytes(32, "little").hex(),
    "y = 0 (order 4)": bytes(32).hex(),
    "y = 0, other x (order 4)": (1 << 255).to_bytes(32, "little").hex(),
    "order 8": ORDER_8,
    "order 8, other x": ORDER_8[:-2] + "85",
    "order 8, -y": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
}
NON_CANONICAL = {
    "y = p + 1 (the identity again)": (P + 1).to_bytes(32, "little").hex(),
    "y = p (y = 0 again)": P.to_bytes(32, "little").hex(),
    "x = 0 with the sign bit set": ((1 << 255) | 1).to_bytes(32, "little").hex(),
}
BAD_KEYS = {**SMALL_ORDER, **NON_CANONICAL}


def test_the_identity_key_makes_one_signature_verify_for_every_message() -> None:
    # The problem: OpenSSL loads the identity point as a public key, and the signature
    # (R = identity, S = 0) then verifies for any message.
    identity = bytes.fromhex(SMALL_ORDER["identity (order 1)"])
    forged = identity + bytes(32)
    raw_key = Ed25519PublicKey.from_public_bytes(identity)
    for payload in (b"pay 1", b"pay 1000000"):
        raw_key.verify(forged, signing_input(b"pbft/test", payload))  # raises if invalid
    with pytest.raises(KeyFormatError, match="small-order"):
        VerifyKey.from_bytes(identity)


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_small_order_and_non_canonical_keys_are_refused(name: str) -> None:
    text = BAD_KEYS[name]
    expected = "small-order" if name in SMALL_ORDER else "non-canonical"
    with pytest.raises(KeyFormatError, match=expected):
        VerifyKey.from_hex(text)
    with pytest.raises(KeyFormatError, match=expected):
        KeyRing.from_dict({"client": {"0": text}})


def test_a_point_off_the_curve_is_refused() -> None:
    # y = 2: (y^2 - 1) / (d y^2 + 1) has no square root.
    assert public_key_problem((2).to_bytes(32, "little")) == "not a point on the curve"


def test_generated_keys_are_accepted() -> None:
    for index in range(50):
        key = SigningKey.derive(7, f"replica/{index}").verify_key
        assert VerifyKey.from_hex(key.hex()) == key


def test_a_public_key_file_with_a_small_order_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "client-0.pub"
    path.write_text(SMALL_ORDER["identity (order 1)"] + "\n")
    with pytest.raises(KeyFileError, match=re.escape(str(path)) + ".*small-order"):
        load_public_key(path)


def test_a_cluster_file_with_a_small_order_key_names_the_field(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=2)
    cluster = load_cluster(path)
    text = path.read_text().replace(cluster.client_keys[1].hex(), SMALL_ORDER["order 8"])
    path.write_text(text)
    with pytest.raises(ClusterFileError, match=r"clients\[1\]\.public_key.*small-order"):
        load_cluster(path)


def test_a_key_shared_by_a_replica_and_a_client_is_refused_naming_both(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=2)
    cluster = load_cluster(path)
    shared = cluster.replica(2).public_key.hex()
    path.write_text(path.read_text().replace(cluster.client_keys[0].hex(), shared))
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    message = str(caught.value)
    assert "clients[0].public_key" in message and "replicas[2].public_key" in message


def test_a_key_shared_by_two_replicas_is_refused(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=1)
    cluster = load_cluster(path)
    text = path.read_text().replace(
        cluster.replica(3).public_key.hex(), cluster.replica(0).public_key.hex()
    )
    path.write_text(text)
    with pytest.raises(ClusterFileError, match=r"replicas\[3\]\.public_key.*replicas\[0\]"):
        load_cluster(path)


def test_the_key_ring_refuses_one_key_for_two_principals() -> None:
    key = SigningKey.derive(1, "replica/0").verify_key
    ring = KeyRing({("replica", 0): key})
    ring.add(("replica", 0), key)  # the same principal again: fine
    with pytest.raises(DuplicateKeyError, match="replica 0 and client 5"):
        ring.add(("client", 5), key)
    assert ("client", 5) not in ring
    with pytest.raises(DuplicateKeyError, match="client 0 and client 1"):
        KeyRing.from_dict({"client": {"0": key.hex(), "1": key.hex()}})
