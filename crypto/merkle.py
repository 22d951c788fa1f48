"""RFC 6962 (Certificate Transparency) SHA-256 Merkle trees over any number of leaves.

Imported by the sans-I/O protocol core: no I/O, clock or randomness imports here.

The RFC defines the tree recursively, splitting n leaves at the largest power of two
below n. Pairing nodes level by level and carrying an unpaired last node up unchanged
builds exactly that tree in O(n), which is what the functions below do.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

HASH_SIZE: Final = 32

# Distinct prefixes for leaves and inner nodes stop a second-preimage attack in which
# an inner node is passed off as a leaf.
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
# RFC 6962: the root of a tree with no leaves.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The inner node above two subtrees' roots."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    # node_hash inlined: half the time of a call per pair, on a million-leaf genesis.
    sha256, prefix = hashlib.sha256, _NODE_PREFIX
    paired = [
        sha256(prefix + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
    ]
    if len(level) % 2 == 1:
        paired.append(level[-1])
    return paired


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if len(leaves) == 0:
        return EMPTY_ROOT
    level = [leaf_hash(leaf) for leaf in leaves]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


@dataclass(frozen=True)
class MerkleProof:
    """Proof that leaf `index` is in a tree of `tree_size` leaves.

    Not validated on construction: proofs arrive from peers, so verify_inclusion does
    every check and answers False instead of raising.
    """

    index: int
    tree_size: int
    path: tuple[bytes, ...]  # sibling hashes, bottom-up


def inclusion_proof(leaves: Sequence[bytes], index: int) -> MerkleProof:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"index must be an int, not {type(index).__name__}")
    # Negative indices are refused rather than counted from the end, as in a proof they
    # would name a different leaf than the caller probably meant.
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    path: list[bytes] = []
    level = [leaf_hash(leaf) for leaf in leaves]
    position = index
    while len(level) > 1:
        sibling = position ^ 1
        # The last node of an odd level has no sibling: it moves up without a path entry.
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level)
        position //= 2
    return MerkleProof(index=index, tree_size=len(leaves), path=tuple(path))


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_inclusion(root: bytes, leaf: bytes, proof: MerkleProof) -> bool:
    """True if `proof` shows `leaf` at `proof.index` in the tree with `root`.

    Never raises: any malformed argument gives False. Follows RFC 9162 section 2.1.3.2.
    """
    if not isinstance(leaf, bytes) or not isinstance(proof, MerkleProof):
        return False
    return verify_node(root, leaf_hash(leaf), proof.index, proof.tree_size, proof.path)


def level_up(nodes: Sequence[bytes], levels: int) -> list[bytes]:
    """The nodes `levels` levels above `nodes` (hashes of one level of an RFC 6962 tree).

    Level h of a tree over n leaves holds the roots of the aligned blocks of 2**h leaves
    (the last block may be short), so this is how a block's root is found from its part.
    """
    level = list(nodes)
    for _ in range(levels):
        if len(level) <= 1:
            break
        level = _next_level(level)
    return level


def node_path(nodes: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path, bottom-up, from `nodes[index]` to the root of the tree above `nodes`."""
    if not 0 <= index < len(nodes):
        raise IndexError(f"node index {index} out of range for {len(nodes)} nodes")
    path: list[bytes] = []
    level = list(nodes)
    position = index
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        level = _next_level(level)
        position //= 2
    return path


def verify_node(
    root: bytes, node: bytes, index: int, level_size: int, path: Sequence[bytes]
) -> bool:
    """True if `path` shows `node` at `index` of a tree level holding `level_size` nodes
    under `root`. A leaf is the case node = leaf_hash(leaf), level_size = tree size; a
    block of 2**h aligned leaves is node = merkle_root(block), level_size = ceil(n / 2**h).

    Never raises: any malformed argument gives False.
    """
    if not (_is_hash(root) and _is_hash(node)):
        return False
    if not (_is_count(index) and _is_count(level_size) and index < level_size):
        return False
    path = tuple(path) if isinstance(path, list | tuple) else path
    # A proof is never longer than the tree is tall; checking first also bounds the work.
    if not isinstance(path, tuple) or len(path) > (level_size - 1).bit_length():
        return False
    if not all(_is_hash(sibling) for sibling in path):
        return False

    position = index
    last_position = level_size - 1
    computed = node
    for sibling in path:
        if last_position == 0:
            return False  # path longer than this node's branch
        if position % 2 == 1 or position == last_position:
            computed = node_hash(sibling, computed)
            # Skip levels where this node was the unpaired last node and moved up alone.
            while position % 2 == 0 and position != 0:
                position >>= 1
                last_position >>= 1
        else:
            computed = node_hash(computed, sibling)
        position >>= 1
        last_position >>= 1
    # last_position reaching 0 means the path covered every level up to the root.
    return last_position == 0 and hmac.compare_digest(computed, root)


def tree_levels(leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Every level of the tree above `leaf_hashes`, each level's hashes concatenated into one
    bytes object (32 bytes a node): a million-leaf tree is two objects of 32 MB, not two
    million small ones. Bottom-up; the last level holds the root alone."""
    if not leaf_hashes:
        return []
    level = list(leaf_hashes)
    levels = [b"".join(level)]
    while len(level) > 1:
        level = _next_level(level)
        levels.append(b"".join(level))
    return levels


class MerkleTree:
    """An RFC 6962 tree that keeps its inner nodes, so setting or appending a leaf costs
    O(log n) hashes and the root of an unchanged tree costs nothing.

    Copy-on-write over `base` (levels from `tree_levels`, never modified): the nodes this
    tree changed live in one dict per level, so trees that start from the same large base
    (every replica of one genesis in a simulator process) share it and each pays only for
    what it changed.
    """

    def __init__(self, base: Sequence[bytes] = ()) -> None:
        self._base = tuple(base)
        self._sizes = [len(level) // HASH_SIZE for level in self._base]
        self._changed: list[dict[int, bytes]] = [{} for _ in self._base]

    def __len__(self) -> int:
        return self._sizes[0] if self._sizes else 0

    def _node(self, level: int, index: int) -> bytes:
        node = self._changed[level].get(index)
        if node is not None:
            return node
        start = index * HASH_SIZE
        return self._base[level][start : start + HASH_SIZE]

    def update(self, leaf_hashes: dict[int, bytes]) -> None:
        """Set the leaves at these indices to these hashes; an index equal to the current
        size (then that size plus one, and so on) appends. O(k log n) for k leaves."""
        if not leaf_hashes:
            return
        if not self._sizes:
            self._sizes.append(0)
            self._changed.append({})
        size = self._sizes[0]
        dirty = sorted(leaf_hashes)
        for index in dirty:
            if not 0 <= index <= size:
                raise IndexError(f"leaf {index} is beyond the end of a tree of {size} leaves")
            if index == size:
                size += 1
        self._sizes[0] = size
        self._changed[0].update(leaf_hashes)
        level = 0
        while self._sizes[level] > 1:
            width = self._sizes[level]
            if level + 1 == len(self._sizes):
                self._sizes.append(0)
                self._changed.append({})
            self._sizes[level + 1] = (width + 1) // 2
            above = self._changed[level + 1]
            parents: list[int] = []
            for index in dirty:
                parent = index >> 1
                if parents and parents[-1] == parent:
                    continue
                parents.append(parent)
                left = self._node(level, 2 * parent)
                # An unpaired last node moves up unchanged, as in merkle_root.
                above[parent] = (
                    node_hash(left, self._node(level, 2 * parent + 1))
                    if 2 * parent + 1 < width
                    else left
                )
            dirty = parents
            level += 1

    def root(self) -> bytes:
        if not self._sizes or self._sizes[0] == 0:
            return EMPTY_ROOT
        return self._node(len(self._sizes) - 1, 0)

    def proof(self, index: int) -> MerkleProof:
        """The inclusion proof of leaf `index`, the same one `inclusion_proof` gives."""
        return MerkleProof(index=index, tree_size=len(self), path=tuple(self.node_path(0, index)))

    def level_size(self, level: int) -> int:
        """Nodes at `level` (0 = the leaves): ceil(n / 2**level)."""
        size = len(self)
        return (size + (1 << level) - 1) >> level

    def node_path(self, level: int, index: int) -> list[bytes]:
        """Audit path, bottom-up, from node `index` of `level` to the root: what `node_path`
        gives for that level's nodes, without the level (the root of an aligned block of
        2**level leaves is proven this way)."""
        if not 0 <= index < self.level_size(level):
            raise IndexError(f"node {index} out of range for level {level}")
        path: list[bytes] = []
        position = index
        while level < len(self._sizes) and self._sizes[level] > 1:
            sibling = position ^ 1
            if sibling < self._sizes[level]:
                path.append(self._node(level, sibling))
            position >>= 1
            level += 1
        return path
