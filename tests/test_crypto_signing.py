"""Tests for crypto.signing: the signing input and the verification cache."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import SigningKey, VerifyKey
from crypto.signing import (
    SIGNATURE_SIZE,
    SMALL_PAYLOAD,
    VerificationCache,
    VerificationCacheStatistics,
    signing_input,
)


class CountingVerifyKey(VerifyKey):
    """A verify key that counts full signature verifications."""

    def __init__(self, key: VerifyKey) -> None:
        super().__init__(key._public_key)
        self.verifications = 0

    def verify(self, domain: bytes, payload: bytes, signature: bytes) -> bool:
        self.verifications += 1
        return super().verify(domain, payload, signature)


SIGNER = SigningKey.derive(3, "client/0")
OTHER_SIGNER = SigningKey.derive(3, "client/1")


def _counting_key(signer: SigningKey = SIGNER) -> CountingVerifyKey:
    return CountingVerifyKey(signer.verify_key)


def _statistics(cache: VerificationCache) -> tuple[int, int, int, int, int]:
    stats = cache.statistics()
    return (stats.hits, stats.misses, stats.failures, stats.evictions, stats.entries)


# --- signing input ------------------------------------------------------------------------


def test_signature_size_is_ed25519_size() -> None:
    assert SIGNATURE_SIZE == 64 == len(SIGNER.sign(b"request", b""))


def test_signing_input_layout() -> None:
    assert signing_input(b"prepare", b"\x00\xff") == b"pbft-sig-v1\0\x07prepare\x00\xff"


def test_signing_input_accepts_domain_of_1_to_255_bytes() -> None:
    assert signing_input(b"d", b"").endswith(b"\x01d")
    assert signing_input(b"d" * 255, b"p")[12] == 255


@pytest.mark.parametrize("domain", [b"", b"d" * 256])
def test_signing_input_rejects_domain_length_outside_1_to_255(domain: bytes) -> None:
    with pytest.raises(ValueError, match="domain"):
        signing_input(domain, b"payload")


@pytest.mark.parametrize(("domain", "payload"), [("prepare", b""), (b"prepare", "text")])
def test_signing_input_rejects_non_bytes(domain: object, payload: object) -> None:
    with pytest.raises(TypeError):
        signing_input(domain, payload)  # type: ignore[arg-type]


def test_signing_inputs_differ_when_domain_payload_boundary_moves() -> None:
    assert signing_input(b"ab", b"c") != signing_input(b"a", b"bc")


# --- verification cache -------------------------------------------------------------------


@pytest.mark.parametrize("max_entries", [0, -1])
def test_cache_requires_at_least_one_entry(max_entries: int) -> None:
    with pytest.raises(ValueError):
        VerificationCache(max_entries=max_entries)


def test_cache_starts_empty() -> None:
    assert VerificationCache(max_entries=10).statistics() == VerificationCacheStatistics(
        hits=0, misses=0, failures=0, evictions=0, entries=0, max_entries=10
    )


def test_second_verify_of_same_signature_is_a_hit() -> None:
    cache = VerificationCache()
    key = _counting_key()
    signature = SIGNER.sign(b"request", b"pay 5")
    assert cache.verify(key, b"request", b"pay 5", signature)
    assert _statistics(cache) == (0, 1, 0, 0, 1)
    assert cache.verify(key, b"request", b"pay 5", signature)
    assert _statistics(cache) == (1, 1, 0, 0, 1)
    assert key.verifications == 1


def test_failing_signature_is_never_cached_as_success() -> None:
    cache = VerificationCache()
    key = _counting_key()
    forged = OTHER_SIGNER.sign(b"request", b"pay 5")
    assert not cache.verify(key, b"request", b"pay 5", forged)
    assert not cache.verify(key, b"request", b"pay 5", forged)
    assert _statistics(cache) == (0, 2, 2, 0, 0)
    # Recomputed each time rather than remembered in any form.
    assert key.verifications == 2


def test_cached_signature_does_not_pass_for_other_payload() -> None:
    cache = VerificationCache()
    key = _counting_key()
    signature = SIGNER.sign(b"request", b"payload A")
    assert cache.verify(key, b"request", b"payload A", signature)
    assert not cache.verify(key, b"request", b"payload B", signature)


def test_cached_signature_does_not_pass_for_other_domain() -> None:
    cache = VerificationCache()
    key = _counting_key()
    signature = SIGNER.sign(b"prepare", b"payload")
    assert cache.verify(key, b"prepare", b"payload", signature)
    assert not cache.verify(key, b"commit", b"payload", signature)


def test_cached_signature_does_not_pass_for_other_key() -> None:
    cache = VerificationCache()
    signature = SIGNER.sign(b"request", b"payload")
    assert cache.verify(SIGNER.verify_key, b"request", b"payload", signature)
    assert not cache.verify(OTHER_SIGNER.verify_key, b"request", b"payload", signature)


def test_cache_entry_cannot_be_reused_by_shifting_signature_bytes_into_payload() -> None:
    # signature[:-1] + (signature[-1:] + payload) hashes the same bytes as the cached entry;
    # only the signature length check tells them apart.
    cache = VerificationCache()
    key = _counting_key()
    signature = SIGNER.sign(b"request", b"payload")
    assert cache.verify(key, b"request", b"payload", signature)
    assert not cache.verify(key, b"request", signature[-1:] + b"payload", signature[:-1])
    assert not cache.verify(key, b"request", b"payload"[1:], signature + b"payload"[:1])


def test_cache_evicts_least_recently_used_beyond_max_entries() -> None:
    cache = VerificationCache(max_entries=2)
    key = _counting_key()
    signatures = {name: SIGNER.sign(b"request", name) for name in (b"A", b"B", b"C")}

    def verify(name: bytes) -> bool:
        return cache.verify(key, b"request", name, signatures[name])

    assert verify(b"A") and verify(b"B")
    assert verify(b"A")  # A is now more recently used than B
    assert verify(b"C")  # evicts B
    stats = cache.statistics()
    assert (stats.evictions, stats.entries) == (1, 2)
    verifications_before = key.verifications
    assert verify(b"A") and verify(b"C")
    assert key.verifications == verifications_before  # both still cached
    assert verify(b"B")
    assert key.verifications == verifications_before + 1  # B was evicted
    assert cache.statistics().entries == 2


def test_cache_with_one_entry_keeps_only_the_latest() -> None:
    cache = VerificationCache(max_entries=1)
    first = SIGNER.sign(b"request", b"1")
    second = SIGNER.sign(b"request", b"2")
    assert cache.verify(SIGNER.verify_key, b"request", b"1", first)
    assert cache.verify(SIGNER.verify_key, b"request", b"2", second)
    assert cache.verify(SIGNER.verify_key, b"request", b"1", first)
    assert _statistics(cache) == (0, 3, 0, 2, 1)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 63, b"\x00" * 65, None, "sig", 7])
def test_cache_rejects_malformed_signature_without_raising(signature: object) -> None:
    cache = VerificationCache()
    assert not cache.verify(SIGNER.verify_key, b"request", b"payload", signature)  # type: ignore[arg-type]
    assert cache.statistics().failures == 1
    assert cache.statistics().entries == 0


def test_cache_rejects_invalid_domain() -> None:
    signature = SIGNER.sign(b"request", b"payload")
    with pytest.raises(ValueError):
        VerificationCache().verify(SIGNER.verify_key, b"", b"payload", signature)


def test_cache_statistics_are_frozen() -> None:
    stats = VerificationCache().statistics()
    with pytest.raises(FrozenInstanceError):
        stats.hits = 5  # type: ignore[misc]


@settings(max_examples=300, database=None)
@given(
    signature=st.one_of(
        st.binary(max_size=130),
        st.binary(min_size=64, max_size=64),
        st.text(max_size=70),
        st.integers(),
        st.none(),
    ),
    payload=st.binary(max_size=40),
)
def test_cache_verify_never_raises_and_never_accepts_forgeries(
    signature: object, payload: bytes
) -> None:
    cache = VerificationCache(max_entries=4)
    genuine = SIGNER.sign(b"request", b"genuine")
    assert cache.verify(SIGNER.verify_key, b"request", b"genuine", genuine)
    result = cache.verify(SIGNER.verify_key, b"request", payload, signature)  # type: ignore[arg-type]
    assert result is (payload == b"genuine" and signature == genuine)


def test_cache_keeps_a_long_payload_as_its_digest_and_still_tells_payloads_apart() -> None:
    cache = VerificationCache()
    key = _counting_key()
    long_payload = bytes(SMALL_PAYLOAD) + b"A"
    signature = SIGNER.sign(b"request", long_payload)
    assert cache.verify(key, b"request", long_payload, signature)
    assert cache.verify(key, b"request", bytes(long_payload), signature)  # equal, not same
    assert key.verifications == 1
    assert not cache.verify(key, b"request", bytes(SMALL_PAYLOAD) + b"B", signature)
    assert not cache.verify(key, b"request", long_payload[:SMALL_PAYLOAD], signature)
    assert _statistics(cache)[:2] == (1, 3)
