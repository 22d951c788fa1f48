"""Tests for crypto.keys: key construction, signatures and the key ring."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import KeyFormatError, KeyRing, SigningKey, VerifyKey

CRYPTO_DIRECTORY = Path(__file__).resolve().parent.parent / "crypto"
SANS_IO_MODULES = ["keys.py", "signing.py", "merkle.py"]
FORBIDDEN_IMPORTS = {"os", "time", "random", "socket", "trio", "pathlib", "secrets"}


def _key(label: str) -> SigningKey:
    return SigningKey.derive(7, label)


# --- the sans-I/O import rule ------------------------------------------------------------


@pytest.mark.parametrize("module_name", SANS_IO_MODULES)
def test_sans_io_module_imports_no_io_clock_or_randomness(module_name: str) -> None:
    tree = ast.parse((CRYPTO_DIRECTORY / module_name).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN_IMPORTS


def test_package_init_does_not_import_keyfiles() -> None:
    # Importing crypto.keys runs crypto/__init__.py, so it must stay free of file I/O too.
    tree = ast.parse((CRYPTO_DIRECTORY / "__init__.py").read_text())
    modules = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "crypto.keyfiles" not in modules
    assert not {module.split(".")[0] for module in modules} & FORBIDDEN_IMPORTS


# --- key construction --------------------------------------------------------------------


def test_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    assert SigningKey.from_seed(seed).private_bytes() == SigningKey.from_seed(seed).private_bytes()
    assert SigningKey.from_seed(seed).verify_key == SigningKey.from_seed(seed).verify_key


def test_from_seed_differs_across_seeds() -> None:
    assert (
        SigningKey.from_seed(bytes(32)).verify_key
        != SigningKey.from_seed(bytes(31) + b"\x01").verify_key
    )


def test_private_bytes_round_trip_through_from_seed() -> None:
    key = SigningKey.generate()
    assert len(key.private_bytes()) == 32
    assert SigningKey.from_seed(key.private_bytes()).verify_key == key.verify_key


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), bytes(64), "0" * 32, None, 5])
def test_from_seed_rejects_anything_but_32_bytes(seed: object) -> None:
    with pytest.raises(KeyFormatError):
        SigningKey.from_seed(seed)  # type: ignore[arg-type]


def test_derive_is_deterministic() -> None:
    assert (
        SigningKey.derive(42, "replica/0").private_bytes()
        == SigningKey.derive(42, "replica/0").private_bytes()
    )


def test_derive_differs_across_labels() -> None:
    labels = ["replica/0", "replica/1", "client/0", "", "replica/00"]
    public_keys = {SigningKey.derive(42, label).verify_key for label in labels}
    assert len(public_keys) == len(labels)


def test_derive_differs_across_master_seeds() -> None:
    seeds = [0, 1, 42, 2**32, 2**64 - 1]
    public_keys = {SigningKey.derive(seed, "replica/0").verify_key for seed in seeds}
    assert len(public_keys) == len(seeds)


@pytest.mark.parametrize("label", ["replica/3", "client/\u00e9\u4e2d"])
def test_derive_follows_documented_formula(label: str) -> None:
    # The simulator relies on this exact formula for reproducible runs across versions.
    seed = hashlib.sha256(
        b"pbft-key-derivation-v1\0" + (1234).to_bytes(8, "big") + label.encode("utf-8")
    ).digest()
    assert SigningKey.derive(1234, label).private_bytes() == seed


@pytest.mark.parametrize("master_seed", [-1, 2**64, 2**100, True, "1", 1.0, None])
def test_derive_rejects_master_seed_outside_64_bit_range(master_seed: object) -> None:
    with pytest.raises(KeyFormatError):
        SigningKey.derive(master_seed, "replica/0")  # type: ignore[arg-type]


@pytest.mark.parametrize("label", [b"replica/0", None, "\ud800"])
def test_derive_rejects_labels_that_are_not_utf8_text(label: object) -> None:
    with pytest.raises(KeyFormatError):
        SigningKey.derive(1, label)  # type: ignore[arg-type]


def test_generate_gives_distinct_keys() -> None:
    assert SigningKey.generate().verify_key != SigningKey.generate().verify_key


def test_verify_key_is_cached() -> None:
    key = _key("replica/0")
    assert key.verify_key is key.verify_key


def test_signing_key_repr_hides_private_bytes() -> None:
    key = _key("replica/0")
    assert key.private_bytes().hex() not in repr(key)


# --- signatures ---------------------------------------------------------------------------


def test_sign_then_verify_round_trip() -> None:
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"payload")
    assert len(signature) == 64
    assert key.verify_key.verify(b"prepare", b"payload", signature)


def test_signature_covers_documented_signing_input() -> None:
    # Checked with cryptography directly, so other implementations can reproduce it.
    key = _key("replica/0")
    signature = key.sign(b"commit", b"\x01\x02")
    raw_public_key = Ed25519PublicKey.from_public_bytes(key.verify_key.public_bytes())
    raw_public_key.verify(signature, b"pbft-sig-v1\0" + b"\x06" + b"commit" + b"\x01\x02")


def test_verify_rejects_tampered_payload() -> None:
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"pay 10 to alice")
    assert not key.verify_key.verify(b"prepare", b"pay 90 to alice", signature)
    assert not key.verify_key.verify(b"prepare", b"pay 10 to alice ", signature)


@pytest.mark.parametrize("position", [0, 1, 31, 32, 63])
def test_verify_rejects_tampered_signature(position: int) -> None:
    key = _key("replica/0")
    signature = bytearray(key.sign(b"prepare", b"payload"))
    signature[position] ^= 0x01
    assert not key.verify_key.verify(b"prepare", b"payload", bytes(signature))


def test_signature_for_one_domain_fails_for_another() -> None:
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"view=1 seq=2")
    assert not key.verify_key.verify(b"commit", b"view=1 seq=2", signature)


def test_domain_and_payload_boundary_is_unambiguous() -> None:
    # Without the length prefix, (b"pre", b"pare...") and (b"prepare", b"...") would coincide.
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"payload")
    assert not key.verify_key.verify(b"pre", b"parepayload", signature)
    assert not key.verify_key.verify(b"preparepay", b"load", signature)


def test_verify_rejects_signature_from_another_key() -> None:
    signature = _key("replica/0").sign(b"prepare", b"payload")
    assert not _key("replica/1").verify_key.verify(b"prepare", b"payload", signature)


@pytest.mark.parametrize("length", [0, 1, 32, 63, 65, 128])
def test_verify_rejects_wrong_length_signature(length: int) -> None:
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"payload")
    wrong_length = (signature * 2)[:length]
    assert not key.verify_key.verify(b"prepare", b"payload", wrong_length)


@pytest.mark.parametrize("signature", [None, 0, "x" * 64, ["a"] * 64, object()])
def test_verify_rejects_non_bytes_signature(signature: object) -> None:
    assert not _key("replica/0").verify_key.verify(b"prepare", b"payload", signature)  # type: ignore[arg-type]


def test_verify_rejects_hex_text_of_a_valid_signature() -> None:
    key = _key("replica/0")
    signature = key.sign(b"prepare", b"payload")
    assert not key.verify_key.verify(b"prepare", b"payload", signature.hex())  # type: ignore[arg-type]


@settings(max_examples=300, database=None)
@given(
    signature=st.one_of(
        st.binary(max_size=130),
        st.binary(min_size=64, max_size=64),
        st.text(max_size=70),
        st.integers(),
        st.none(),
    )
)
def test_verify_never_raises_on_arbitrary_signatures(signature: object) -> None:
    result = _key("replica/0").verify_key.verify(b"prepare", b"payload", signature)  # type: ignore[arg-type]
    assert result is False


@pytest.mark.parametrize("domain", [b"", bytes(256), "prepare"])
def test_sign_rejects_invalid_domain(domain: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        _key("replica/0").sign(domain, b"payload")  # type: ignore[arg-type]


# --- verify key encoding ------------------------------------------------------------------


def test_verify_key_bytes_and_hex_round_trip() -> None:
    verify_key = _key("replica/0").verify_key
    assert VerifyKey.from_bytes(verify_key.public_bytes()) == verify_key
    assert VerifyKey.from_hex(verify_key.hex()) == verify_key
    assert VerifyKey.from_hex(verify_key.hex().upper()) == verify_key
    assert verify_key.hex() == verify_key.public_bytes().hex()


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_from_bytes_rejects_wrong_length(length: int) -> None:
    with pytest.raises(KeyFormatError):
        VerifyKey.from_bytes(bytes(length))


@pytest.mark.parametrize("raw", [None, "a" * 32, 32, [0] * 32])
def test_from_bytes_rejects_non_bytes(raw: object) -> None:
    with pytest.raises(KeyFormatError):
        VerifyKey.from_bytes(raw)  # type: ignore[arg-type]


@settings(max_examples=300, database=None)
@given(raw=st.one_of(st.binary(max_size=40), st.binary(min_size=32, max_size=32)))
def test_from_bytes_raises_only_key_format_error(raw: bytes) -> None:
    try:
        VerifyKey.from_bytes(raw)
    except KeyFormatError:
        pass


@pytest.mark.parametrize(
    "text",
    [
        "",
        "zz" * 32,
        "ab" * 31,
        "ab" * 33,
        "a" * 63,
        " " + "ab" * 31 + "a",
        "ab" * 31 + "\n\n",
        "ab " * 21 + "a",
        "\u0661" * 64,  # Arabic-Indic digit one: a digit, but not hex
    ],
)
def test_from_hex_rejects_malformed_hex(text: str) -> None:
    with pytest.raises(KeyFormatError):
        VerifyKey.from_hex(text)


def test_from_hex_rejects_non_text() -> None:
    with pytest.raises(KeyFormatError):
        VerifyKey.from_hex(b"ab" * 32)  # type: ignore[arg-type]


def test_verify_keys_are_equal_and_hashed_by_public_bytes() -> None:
    first = _key("replica/0").verify_key
    same = VerifyKey.from_bytes(first.public_bytes())
    other = _key("replica/1").verify_key
    assert first == same and hash(first) == hash(same)
    assert first != other
    assert len({first, same, other}) == 2
    assert first != first.public_bytes()


# --- key ring -----------------------------------------------------------------------------


def _ring() -> KeyRing:
    ring = KeyRing()
    for replica in (2, 0, 10, 1):
        ring.add(("replica", replica), _key(f"replica/{replica}").verify_key)
    for client in (5, 3):
        ring.add(("client", client), _key(f"client/{client}").verify_key)
    return ring


def test_key_ring_add_then_get() -> None:
    ring = _ring()
    assert ring.get(("replica", 10)) == _key("replica/10").verify_key
    assert ring.get(("client", 3)) == _key("client/3").verify_key


@pytest.mark.parametrize(
    "principal", [("replica", 4), ("client", 0), ("server", 0), ("replica", [1]), "replica", None]
)
def test_key_ring_get_of_unknown_or_malformed_principal_is_none(principal: object) -> None:
    ring = _ring()
    assert ring.get(principal) is None  # type: ignore[arg-type]
    assert principal not in ring


def test_key_ring_contains_and_len() -> None:
    ring = _ring()
    assert len(ring) == 6
    assert ("replica", 0) in ring
    assert ("client", 0) not in ring
    assert len(KeyRing()) == 0


def test_key_ring_ids_are_sorted_numerically() -> None:
    ring = _ring()
    assert ring.replica_ids() == [0, 1, 2, 10]
    assert ring.client_ids() == [3, 5]


def test_key_ring_readding_same_key_is_allowed() -> None:
    ring = _ring()
    ring.add(("replica", 0), VerifyKey.from_bytes(_key("replica/0").verify_key.public_bytes()))
    assert len(ring) == 6


def test_key_ring_rejects_conflicting_key_for_principal() -> None:
    ring = _ring()
    with pytest.raises(ValueError, match="different key"):
        ring.add(("replica", 0), _key("replica/1").verify_key)
    assert ring.get(("replica", 0)) == _key("replica/0").verify_key


@pytest.mark.parametrize(
    "principal",
    [
        ("server", 0),
        ("Replica", 0),
        ("replica", -1),
        ("replica", True),
        ("replica", "0"),
        ("replica", 1.0),
        ("replica",),
        ("replica", 0, 0),
        ["replica", 0],
        None,
    ],
)
def test_key_ring_rejects_malformed_principal(principal: object) -> None:
    with pytest.raises(ValueError):
        KeyRing().add(principal, _key("replica/0").verify_key)  # type: ignore[arg-type]


def test_key_ring_rejects_non_verify_key() -> None:
    with pytest.raises(TypeError):
        KeyRing().add(("replica", 0), _key("replica/0").verify_key.hex())  # type: ignore[arg-type]


def test_key_ring_constructor_takes_a_mapping() -> None:
    key = _key("replica/0").verify_key
    ring = KeyRing({("replica", 0): key})
    assert ring.get(("replica", 0)) == key
    with pytest.raises(ValueError):
        KeyRing({("server", 0): key})


def test_key_ring_to_dict_shape_and_order() -> None:
    data = _ring().to_dict()
    assert list(data) == ["replica", "client"]
    assert list(data["replica"]) == ["0", "1", "2", "10"]
    assert list(data["client"]) == ["3", "5"]
    assert data["replica"]["10"] == _key("replica/10").verify_key.hex()
    assert KeyRing().to_dict() == {"replica": {}, "client": {}}


def test_key_ring_dict_round_trip() -> None:
    ring = _ring()
    restored = KeyRing.from_dict(ring.to_dict())
    assert restored.to_dict() == ring.to_dict()
    assert restored.get(("client", 5)) == ring.get(("client", 5))


def test_key_ring_from_dict_accepts_missing_role() -> None:
    key_hex = _key("replica/0").verify_key.hex()
    assert KeyRing.from_dict({"replica": {"0": key_hex}}).client_ids() == []


_GOOD_HEX = SigningKey.derive(7, "replica/0").verify_key.hex()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replica": {"0": "zz"}}, "replica/0"),
        ({"client": {"4": _GOOD_HEX[:-2]}}, "client/4"),
        ({"client": {"4": None}}, "client/4"),
        ({"replica": {"-1": _GOOD_HEX}}, "'-1'"),
        ({"replica": {"01": _GOOD_HEX}}, "'01'"),
        ({"replica": {" 1": _GOOD_HEX}}, "' 1'"),
        ({"replica": {"\u0661": _GOOD_HEX}}, "replica id"),
        ({"replica": {"9" * 5000: _GOOD_HEX}}, "too long"),
        ({"replica": {0: _GOOD_HEX}}, "replica id"),
        ({"replica": ["0", _GOOD_HEX]}, "'replica'"),
        ({"server": {}}, "server"),
        (["replica"], "mapping"),
    ],
)
def test_key_ring_from_dict_error_names_bad_entry(data: object, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message.replace("'", "['\"]?")):
        KeyRing.from_dict(data)  # type: ignore[arg-type]
