"""Ed25519 keys, domain-separated signatures and Merkle trees for the PBFT network.

Only the sans-I/O modules are re-exported here; import file handling explicitly from
crypto.keyfiles so that importing this package never pulls in I/O code.
"""

from crypto.keys import KeyFormatError, KeyRing, Principal, SigningKey, VerifyKey
from crypto.merkle import MerkleProof, inclusion_proof, leaf_hash, merkle_root, verify_inclusion
from crypto.signing import (
    SIGNATURE_SIZE,
    VerificationCache,
    VerificationCacheStatistics,
    signing_input,
)

__all__ = [
    "SIGNATURE_SIZE",
    "KeyFormatError",
    "KeyRing",
    "MerkleProof",
    "Principal",
    "SigningKey",
    "VerificationCache",
    "VerificationCacheStatistics",
    "VerifyKey",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "signing_input",
    "verify_inclusion",
]
