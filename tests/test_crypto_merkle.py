"""Tests for crypto.merkle: RFC 6962 roots and inclusion proofs."""

from __future__ import annotations

import hashlib
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.merkle import (
    MerkleProof,
    MerkleTree,
    inclusion_proof,
    leaf_hash,
    level_up,
    merkle_root,
    node_path,
    tree_levels,
    verify_inclusion,
)

# Published test vectors of the Certificate Transparency reference implementations.
RFC6962_LEAVES = [
    bytes.fromhex(text)
    for text in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
RFC6962_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# (index, tree size, path); the reference suites number leaves from 1, these from 0.
RFC6962_INCLUSION_PROOFS = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


# A naive transcription of the recursive definitions in RFC 6962 section 2.1, written
# independently of crypto.merkle's level-by-level algorithm.
def _reference_leaf(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _reference_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _reference_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return _reference_leaf(leaves[0])
    k = _largest_power_of_two_below(len(leaves))
    return _reference_node(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


def _reference_path(index: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = _largest_power_of_two_below(len(leaves))
    if index < k:
        return _reference_path(index, leaves[:k]) + [_reference_root(leaves[k:])]
    return _reference_path(index - k, leaves[k:]) + [_reference_root(leaves[:k])]


def _leaves(count: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(count)]


def _flip_first_bit(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def test_leaf_hash_prefixes_zero_byte() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()


def test_empty_tree_root_is_sha256_of_empty_string() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("size", sorted(RFC6962_ROOTS))
def test_root_matches_published_rfc6962_vector(size: int) -> None:
    assert merkle_root(RFC6962_LEAVES[:size]).hex() == RFC6962_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "path"), RFC6962_INCLUSION_PROOFS)
def test_inclusion_proof_matches_published_rfc6962_vector(
    index: int, size: int, path: list[str]
) -> None:
    proof = inclusion_proof(RFC6962_LEAVES[:size], index)
    assert [sibling.hex() for sibling in proof.path] == path
    root = bytes.fromhex(RFC6962_ROOTS[size])
    assert verify_inclusion(root, RFC6962_LEAVES[index], proof)


@pytest.mark.parametrize("size", range(0, 70))
def test_root_matches_naive_recursive_definition(size: int) -> None:
    leaves = _leaves(size)
    assert merkle_root(leaves) == _reference_root(leaves)


@pytest.mark.parametrize("size", range(1, 34))
def test_every_index_proves_and_verifies(size: int) -> None:
    leaves = _leaves(size)
    root = merkle_root(leaves)
    for index in range(size):
        proof = inclusion_proof(leaves, index)
        assert proof == MerkleProof(index, size, tuple(_reference_path(index, leaves)))
        assert verify_inclusion(root, leaves[index], proof), (size, index)


@pytest.mark.parametrize("size", [2, 3, 7, 8, 9, 33])
def test_proof_for_one_leaf_fails_for_every_other_leaf(size: int) -> None:
    leaves = _leaves(size)
    root = merkle_root(leaves)
    for index in range(size):
        proof = inclusion_proof(leaves, index)
        for other in range(size):
            if other != index:
                assert not verify_inclusion(root, leaves[other], proof), (size, index, other)


def test_proof_fails_against_another_root() -> None:
    leaves = _leaves(10)
    proof = inclusion_proof(leaves, 4)
    assert not verify_inclusion(merkle_root(_leaves(11)), leaves[4], proof)
    assert not verify_inclusion(_flip_first_bit(merkle_root(leaves)), leaves[4], proof)


@pytest.mark.parametrize("size", [2, 5, 8, 13, 32, 33])
def test_tampered_path_element_fails(size: int) -> None:
    leaves = _leaves(size)
    root = merkle_root(leaves)
    for index in range(size):
        proof = inclusion_proof(leaves, index)
        for position in range(len(proof.path)):
            path = list(proof.path)
            path[position] = _flip_first_bit(path[position])
            tampered = MerkleProof(index, size, tuple(path))
            assert not verify_inclusion(root, leaves[index], tampered), (size, index, position)


def test_reordered_path_fails() -> None:
    leaves = _leaves(8)
    proof = inclusion_proof(leaves, 3)
    reordered = MerkleProof(3, 8, tuple(reversed(proof.path)))
    assert not verify_inclusion(merkle_root(leaves), leaves[3], reordered)


def test_proof_with_shortened_or_extended_path_fails() -> None:
    leaves = _leaves(9)
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, 2)
    shortened = MerkleProof(2, 9, proof.path[:-1])
    extended = MerkleProof(2, 9, proof.path + (root,))
    assert not verify_inclusion(root, leaves[2], shortened)
    assert not verify_inclusion(root, leaves[2], extended)


def test_proof_with_wrong_index_fails() -> None:
    leaves = _leaves(8)
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, 2)
    for index in range(8):
        if index != 2:
            moved = MerkleProof(index, 8, proof.path)
            assert not verify_inclusion(root, leaves[2], moved), index


@pytest.mark.parametrize(("index", "size"), [(3, 3), (4, 3), (0, 0), (-1, 3)])
def test_proof_with_index_outside_tree_fails(index: int, size: int) -> None:
    leaves = _leaves(3)
    proof = inclusion_proof(leaves, 2)
    bad = MerkleProof(index, size, proof.path)
    assert not verify_inclusion(merkle_root(leaves), leaves[2], bad)


def test_inner_node_cannot_pose_as_leaf() -> None:
    # Without distinct leaf/node prefixes, the concatenated children of the root would be
    # a one-leaf "tree" with the same root.
    leaves = [b"left", b"right"]
    inner_node_as_leaf = leaf_hash(b"left") + leaf_hash(b"right")
    assert not verify_inclusion(merkle_root(leaves), inner_node_as_leaf, MerkleProof(0, 1, ()))


@pytest.mark.parametrize(("count", "index"), [(0, 0), (3, 3), (3, -1), (1, 100)])
def test_inclusion_proof_rejects_out_of_range_index(count: int, index: int) -> None:
    with pytest.raises(IndexError):
        inclusion_proof(_leaves(count), index)


def test_merkle_proof_is_frozen() -> None:
    proof = inclusion_proof(_leaves(4), 1)
    with pytest.raises(FrozenInstanceError):
        proof.index = 2  # type: ignore[misc]


@settings(max_examples=200, database=None)
@given(
    leaves=st.lists(st.binary(max_size=40), min_size=1, max_size=70),
    data=st.data(),
)
def test_every_generated_proof_verifies_and_binds_its_leaf(
    leaves: list[bytes], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1))
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, index)
    assert verify_inclusion(root, leaves[index], proof)
    assert not verify_inclusion(root, leaves[index] + b"x", proof)


_ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-3, 100),
    st.integers(min_value=2**63),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
    st.lists(st.integers(), max_size=3),
)
_PROOF_FIELDS = ["root", "leaf", "index", "tree_size", "path", "path element"]


@settings(max_examples=500, database=None)
@given(
    leaves=st.lists(st.binary(max_size=8), min_size=1, max_size=40),
    corrupted=st.sets(st.sampled_from(_PROOF_FIELDS), min_size=1),
    data=st.data(),
)
def test_verify_inclusion_never_raises_on_malformed_proofs(
    leaves: list[bytes], corrupted: set[str], data: st.DataObject
) -> None:
    # Corrupting a valid proof one field at a time reaches every check; wholly random
    # arguments would almost always be turned away by the first one.
    index = data.draw(st.integers(0, len(leaves) - 1))
    valid = inclusion_proof(leaves, index)
    fields: dict[str, object] = {
        "root": merkle_root(leaves),
        "leaf": leaves[index],
        "index": index,
        "tree_size": len(leaves),
        "path": valid.path,
    }
    for field in corrupted - {"path element"}:
        fields[field] = data.draw(
            st.one_of(_ANYTHING, st.lists(_ANYTHING, max_size=70).map(tuple)), label=field
        )
    path = fields["path"]
    if "path element" in corrupted and isinstance(path, tuple) and path:
        position = data.draw(st.integers(0, len(path) - 1))
        replacement = data.draw(_ANYTHING, label="path element")
        fields["path"] = path[:position] + (replacement,) + path[position + 1 :]
    proof = MerkleProof(fields["index"], fields["tree_size"], fields["path"])  # type: ignore[arg-type]
    result = verify_inclusion(fields["root"], fields["leaf"], proof)  # type: ignore[arg-type]
    assert isinstance(result, bool)


@settings(max_examples=100, database=None)
@given(proof=_ANYTHING)
def test_verify_inclusion_returns_false_for_non_proof_objects(proof: object) -> None:
    assert verify_inclusion(merkle_root([b"a"]), b"a", proof) is False  # type: ignore[arg-type]


# --- the incremental tree -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    initial=st.lists(st.binary(max_size=4), max_size=40),
    steps=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 60), st.binary(max_size=4)), max_size=4),
            st.lists(st.binary(max_size=4), max_size=3),
        ),
        max_size=6,
    ),
)
def test_an_incremental_tree_keeps_the_root_and_proofs_of_its_leaves(
    initial: list[bytes], steps: list[tuple[list[tuple[int, bytes]], list[bytes]]]
) -> None:
    leaves = list(initial)
    shared = tree_levels([leaf_hash(leaf) for leaf in leaves])
    tree, twin = MerkleTree(shared), MerkleTree(shared)
    for changes, appended in steps:
        update: dict[int, bytes] = {}
        for index, leaf in changes:
            if leaves:
                leaves[index % len(leaves)] = leaf
                update[index % len(leaves)] = leaf_hash(leaf)
        for leaf in appended:
            leaves.append(leaf)
            update[len(leaves) - 1] = leaf_hash(leaf)
        tree.update(update)
        assert tree.root() == merkle_root(leaves)
        assert len(tree) == len(leaves)
        for index in range(len(leaves)):
            assert tree.proof(index) == inclusion_proof(leaves, index)
        for level in range(1, 4):
            nodes = level_up([leaf_hash(leaf) for leaf in leaves], level)
            for index in range(tree.level_size(level)):
                assert tree.node_path(level, index) == node_path(nodes, index)
    # Copy-on-write: a tree over the same base is untouched by another's updates.
    assert twin.root() == merkle_root(initial)


def test_an_incremental_tree_refuses_a_leaf_beyond_its_end() -> None:
    tree = MerkleTree(tree_levels([leaf_hash(b"a")]))
    with pytest.raises(IndexError):
        tree.update({2: leaf_hash(b"c")})
    with pytest.raises(IndexError):
        tree.node_path(0, 1)
