"""Ed25519 signing and verify keys, and the cluster's ring of public keys.

Imported by the sans-I/O protocol core: no I/O, clock or randomness imports here
(key generation takes its entropy from `cryptography`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from crypto.signing import is_well_formed_signature, signing_input

Principal = tuple[str, int]  # ("replica", 0) or ("client", 3)

ROLES: Final = ("replica", "client")
SEED_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 32
MAX_MASTER_SEED: Final = 2**64 - 1

# Versioned so that keys derived by a future scheme never coincide with these.
_DERIVATION_PREFIX: Final = b"pbft-key-derivation-v1\0"
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")
_MAX_IDENTIFIER_DIGITS: Final = 20  # enough for any 64-bit id


class KeyFormatError(ValueError):
    """Key material (bytes, hex, key ring data) is malformed."""


class DuplicateKeyError(KeyFormatError):
    """Two principals have the same public key."""


# Edwards25519 (RFC 8032, 5.1): -x^2 + y^2 = 1 + d x^2 y^2 over GF(p).
_P: Final = 2**255 - 19
_D: Final = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1: Final = pow(2, (_P - 1) // 4, _P)


def _times_eight_is_identity(x: int, y: int) -> bool:
    # Three doublings in projective coordinates (a = -1, "dbl-2008-bbjlp"): complete for
    # points on the curve, as d is not a square, and free of inversions.
    big_x, big_y, big_z = x, y, 1
    for _ in range(3):
        b = (big_x + big_y) ** 2 % _P
        c = big_x * big_x % _P
        d = big_y * big_y % _P
        f = (d - c) % _P
        j = (f - 2 * big_z * big_z) % _P
        big_x, big_y, big_z = (b - c - d) * j % _P, f * (-c - d) % _P, f * j % _P
    return big_x == 0 and big_y == big_z


def public_key_problem(raw: bytes) -> str | None:
    """Why 32 bytes are not an acceptable Ed25519 public key, or None if they are.

    OpenSSL loads any 32 bytes. A small-order point (the identity among them) makes a
    key under which one fixed signature verifies for every message, or a handful do; a
    non-canonical encoding gives one point two names (two principals, one key). So we
    decode the point as RFC 8032 5.1.3 does, strictly, and refuse when 8 * point is the
    identity.
    """
    encoded = int.from_bytes(raw, "little")
    sign = encoded >> 255
    y = encoded & ((1 << 255) - 1)
    if y >= _P:
        return "non-canonical encoding (y is not reduced mod p)"
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P != u:
        x = x * _SQRT_M1 % _P
        if v * x * x % _P != u:
            return "not a point on the curve"
    if x == 0 and sign:
        return "non-canonical encoding (x is 0 but its sign bit is set)"
    if x & 1 != sign:
        x = _P - x
    if _times_eight_is_identity(x, y):
        return "a small-order point (a signature under it proves nothing)"
    return None


class VerifyKey:
    """An Ed25519 public key; equal and hashable by its 32 public bytes."""

    __slots__ = ("_public_key", "_raw")

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        if not isinstance(public_key, Ed25519PublicKey):
            raise TypeError("public_key must be an Ed25519PublicKey")
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        problem = public_key_problem(raw)
        if problem is not None:
            raise KeyFormatError(f"unacceptable Ed25519 public key {raw.hex()}: {problem}")
        self._public_key = public_key
        self._raw = raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> VerifyKey:
        if not isinstance(raw, bytes | bytearray):
            raise KeyFormatError(f"public key must be bytes, not {type(raw).__name__}")
        if len(raw) != PUBLIC_KEY_SIZE:
            raise KeyFormatError(f"public key must be {PUBLIC_KEY_SIZE} bytes, got {len(raw)}")
        try:
            public_key = Ed25519PublicKey.from_public_bytes(bytes(raw))
        except ValueError as error:
            raise KeyFormatError(f"invalid Ed25519 public key: {error}") from error
        return cls(public_key)

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        if not isinstance(text, str):
            raise KeyFormatError(f"public key hex must be str, not {type(text).__name__}")
        # Checked explicitly because bytes.fromhex tolerates whitespace.
        if len(text) != 2 * PUBLIC_KEY_SIZE or not _HEX_DIGITS.issuperset(text):
            raise KeyFormatError(
                f"public key must be {2 * PUBLIC_KEY_SIZE} hex digits, got {text[:80]!r}"
            )
        return cls.from_bytes(bytes.fromhex(text))

    def public_bytes(self) -> bytes:
        return self._raw

    def hex(self) -> str:
        return self._raw.hex()

    def verify(self, domain: bytes, payload: bytes, signature: bytes) -> bool:
        """True only for a valid signature; any malformed signature gives False.

        A bad domain or non-bytes payload is a caller bug and raises (see signing_input).
        """
        message = signing_input(domain, payload)
        if not is_well_formed_signature(signature):
            return False
        try:
            self._public_key.verify(bytes(signature), message)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VerifyKey):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.hex()})"


class SigningKey:
    """An Ed25519 private key. Deliberately not comparable and not shown by repr."""

    __slots__ = ("_private_key", "_verify_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519PrivateKey")
        self._private_key = private_key
        # Computed once: every signature check against our own key would otherwise redo it.
        self._verify_key = VerifyKey(private_key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        if not isinstance(seed, bytes | bytearray):
            raise KeyFormatError(f"seed must be bytes, not {type(seed).__name__}")
        if len(seed) != SEED_SIZE:
            raise KeyFormatError(f"seed must be {SEED_SIZE} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def derive(cls, master_seed: int, label: str) -> SigningKey:
        """Deterministic key for `label` (e.g. "replica/0") from a simulation seed.

        Only for reproducible simulations and tests: anyone who knows the master seed
        knows every derived private key.
        """
        # bool is an int subclass; derive(True, ...) is surely a mistake.
        if isinstance(master_seed, bool) or not isinstance(master_seed, int):
            raise KeyFormatError(f"master_seed must be an int, not {type(master_seed).__name__}")
        if not 0 <= master_seed <= MAX_MASTER_SEED:
            raise KeyFormatError(f"master_seed must be in 0..2**64-1, got {master_seed}")
        if not isinstance(label, str):
            raise KeyFormatError(f"label must be str, not {type(label).__name__}")
        try:
            label_bytes = label.encode("utf-8")
        except UnicodeEncodeError as error:
            raise KeyFormatError(f"label is not encodable as UTF-8: {error}") from error
        # The seed has a fixed width, so seed and label cannot run into each other.
        seed = hashlib.sha256(
            _DERIVATION_PREFIX + master_seed.to_bytes(8, "big") + label_bytes
        ).digest()
        return cls.from_seed(seed)

    def private_bytes(self) -> bytes:
        return self._private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def verify_key(self) -> VerifyKey:
        return self._verify_key

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The wrapped `cryptography` key, for serialization (see crypto.keyfiles)."""
        return self._private_key

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        return self._private_key.sign(signing_input(domain, payload))

    def __repr__(self) -> str:
        return f"SigningKey(verify_key={self._verify_key.hex()})"


def check_principal(principal: object) -> Principal:
    """Return `principal` if it is a well-formed (role, id) pair, else raise ValueError."""
    if not isinstance(principal, tuple) or len(principal) != 2:
        raise ValueError(f"principal must be a (role, id) tuple, got {principal!r}")
    role, identifier = principal
    if role not in ROLES:
        raise ValueError(f"principal role must be one of {ROLES}, got {role!r}")
    if isinstance(identifier, bool) or not isinstance(identifier, int) or identifier < 0:
        raise ValueError(f"principal id must be a non-negative int, got {identifier!r}")
    return (role, identifier)


def _parse_identifier(role: str, text: object) -> int:
    # Canonical decimal only, so "1" and "01" cannot both name replica 1.
    if not isinstance(text, str) or not (text.isascii() and text.isdigit()):
        raise KeyFormatError(f"{role} id must be a decimal string, got {text!r}")
    if text != "0" and text.startswith("0"):
        raise KeyFormatError(f"{role} id has leading zeros: {text!r}")
    # Bounded so int() never meets Python's limit on digits (which raises plain ValueError).
    if len(text) > _MAX_IDENTIFIER_DIGITS:
        raise KeyFormatError(f"{role} id is too long: {text[:40]!r}...")
    return int(text)


class KeyRing:
    """The cluster's public keys, by principal."""

    __slots__ = ("_keys", "_owners")

    def __init__(self, keys: Mapping[Principal, VerifyKey] | None = None) -> None:
        self._keys: dict[Principal, VerifyKey] = {}
        self._owners: dict[VerifyKey, Principal] = {}
        for principal, key in (keys or {}).items():
            self.add(principal, key)

    def add(self, principal: Principal, key: VerifyKey) -> None:
        """Add a key; re-adding the same key is a no-op, a different one is an error, and so
        is a key another principal holds (one private key must not sign as two)."""
        principal = check_principal(principal)
        if not isinstance(key, VerifyKey):
            raise TypeError(f"key must be a VerifyKey, not {type(key).__name__}")
        existing = self._keys.get(principal)
        if existing is not None and existing != key:
            raise ValueError(f"{principal[0]} {principal[1]} already has a different key")
        owner = self._owners.get(key)
        if owner is not None and owner != principal:
            raise DuplicateKeyError(
                f"{owner[0]} {owner[1]} and {principal[0]} {principal[1]} have the same "
                f"public key {key.hex()}"
            )
        self._keys[principal] = key
        self._owners[key] = principal

    def get(self, principal: Principal) -> VerifyKey | None:
        # Principals often come straight off the wire; an unhashable one is just unknown.
        try:
            return self._keys.get(principal)
        except TypeError:
            return None

    def __contains__(self, principal: object) -> bool:
        try:
            return principal in self._keys
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._keys)

    def replica_ids(self) -> list[int]:
        return self._ids("replica")

    def client_ids(self) -> list[int]:
        return self._ids("client")

    def _ids(self, role: str) -> list[int]:
        return sorted(identifier for (key_role, identifier) in self._keys if key_role == role)

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {
            role: {
                str(identifier): self._keys[(role, identifier)].hex()
                for identifier in self._ids(role)
            }
            for role in ROLES
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, str]]) -> KeyRing:
        """Inverse of to_dict; a missing role means no keys for it."""
        if not isinstance(data, Mapping):
            raise KeyFormatError(f"key ring must be a mapping, not {type(data).__name__}")
        unknown_roles = [role for role in data if role not in ROLES]
        if unknown_roles:
            raise KeyFormatError(f"unknown key ring roles: {unknown_roles!r}")
        ring = cls()
        for role in ROLES:
            entries = data.get(role, {})
            if not isinstance(entries, Mapping):
                raise KeyFormatError(f"key ring entry {role!r} must be a mapping")
            for text, key_hex in entries.items():
                identifier = _parse_identifier(role, text)
                try:
                    key = VerifyKey.from_hex(key_hex)
                except KeyFormatError as error:
                    raise KeyFormatError(f"key ring entry {role}/{text}: {error}") from error
                ring.add((role, identifier), key)
        return ring

    def __repr__(self) -> str:
        return f"KeyRing(replicas={self.replica_ids()}, clients={self.client_ids()})"
