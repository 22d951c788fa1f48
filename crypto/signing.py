"""Domain-separated signing input and a cache of verified signatures.

Imported by the sans-I/O protocol core: no I/O, clock or randomness imports here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


class VerifyingKey(Protocol):
    """What the cache needs of a public key (crypto.keys.VerifyKey is one). A protocol, not
    an import: keys.py imports this module, and the package's imports run one way."""

    def public_bytes(self) -> bytes: ...

    def verify(self, domain: bytes, payload: bytes, signature: bytes) -> bool: ...


SIGNATURE_SIZE = 64
# The longest payload a cache entry keeps as it is (longer ones are kept as a SHA-256).
SMALL_PAYLOAD = 512
MAX_DOMAIN_SIZE = 255

# Versioned prefix so a future change of the signing input cannot collide with this one.
_SIGNING_PREFIX = b"pbft-sig-v1\0"


def _check_domain(domain: bytes) -> None:
    """Reject domains that would make the length-prefixed encoding ambiguous.

    Domains are chosen by our own code, never by a peer, so a bad one is a bug and raises.
    """
    if not isinstance(domain, bytes):
        raise TypeError(f"domain must be bytes, not {type(domain).__name__}")
    if not 1 <= len(domain) <= MAX_DOMAIN_SIZE:
        raise ValueError(f"domain must be 1..{MAX_DOMAIN_SIZE} bytes, got {len(domain)}")


def signing_input(domain: bytes, payload: bytes) -> bytes:
    """Return the exact bytes that are signed for `payload` under message kind `domain`.

    The one-byte length prefix makes (domain, payload) decodable, so a signature over one
    message kind can never verify as another kind, even if payload bytes happen to line up.
    """
    _check_domain(domain)
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    return _SIGNING_PREFIX + bytes((len(domain),)) + domain + payload


def is_well_formed_signature(signature: object) -> bool:
    """True if `signature` has the shape of an Ed25519 signature (says nothing of validity)."""
    return isinstance(signature, bytes | bytearray) and len(signature) == SIGNATURE_SIZE


@dataclass(frozen=True)
class VerificationCacheStatistics:
    hits: int
    misses: int
    failures: int
    evictions: int
    entries: int
    max_entries: int


class VerificationCache:
    """Bounded LRU cache of signatures already verified, so a replica that meets the same
    signed request several times verifies it once.

    Counters: `hits` are calls answered from the cache; `misses` are calls that ran a full
    verification; `failures` are calls that returned False (a failed full verification or a
    malformed signature, which is rejected before any lookup).
    """

    def __init__(self, max_entries: int = 65536) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int):
            raise TypeError("max_entries must be an int")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        # signature -> (public key, domain, payload or its SHA-256, whether hashed). Keyed by
        # the signature (64 bytes, hashed fast) rather than a digest of everything: a hit
        # then costs comparisons, not a hash of the payload (the same bytes object, in the
        # simulator, so `==` is an identity check). Payloads up to SMALL_PAYLOAD bytes are
        # kept as they are, longer ones as their SHA-256, which bounds what an entry holds.
        self._verified: OrderedDict[bytes, tuple[bytes, bytes, bytes, bool]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._failures = 0
        self._evictions = 0

    def verify(self, key: VerifyingKey, domain: bytes, payload: bytes, signature: bytes) -> bool:
        _check_domain(domain)
        if not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if not is_well_formed_signature(signature):
            self._failures += 1
            return False
        signature = bytes(signature) if type(signature) is not bytes else signature
        public = key.public_bytes()
        hashed = len(payload) > SMALL_PAYLOAD
        stored = hashlib.sha256(payload).digest() if hashed else payload
        entry = self._verified.get(signature)
        if (
            entry is not None
            and entry[3] is hashed
            and entry[2] == stored
            and entry[1] == domain
            and entry[0] == public
        ):
            self._verified.move_to_end(signature)
            self._hits += 1
            return True
        self._misses += 1
        if not key.verify(domain, payload, signature):
            # Never cached: a forged signature must cost the full check every time.
            self._failures += 1
            return False
        self._verified[signature] = (public, domain, stored, hashed)
        self._verified.move_to_end(signature)
        if len(self._verified) > self._max_entries:
            self._verified.popitem(last=False)
            self._evictions += 1
        return True

    def statistics(self) -> VerificationCacheStatistics:
        return VerificationCacheStatistics(
            hits=self._hits,
            misses=self._misses,
            failures=self._failures,
            evictions=self._evictions,
            entries=len(self._verified),
            max_entries=self._max_entries,
        )
