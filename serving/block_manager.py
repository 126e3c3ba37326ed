"""Paged KV cache blocks with automatic prefix caching (vLLM's design, ``vllm/v1/core/kv_cache_manager.py``).

A block id names one row range in every cache layer at once (GLM-5's latent rows and, on indexer
layers, the indexer key rows), so one id is all the scheduler manages.

* Reference counts: a block is held by every running sequence whose block table lists it; it is
  *free* when no sequence holds it.
* Content hashes: once a block is full and its KV computed, it is registered under
  ``hash(parent block's hash, its token ids)``; the chain makes the hash name the whole prefix up to
  and including the block, so equal hashes mean equal KV (same tokens at the same positions).
* A free block keeps its content and its hash until it is reused: a later sequence whose prompt
  starts with the same tokens takes it back instead of recomputing it. Free blocks are reused in
  LRU order, and a sequence gives its blocks back last-block-first, so a prefix's tail is evicted
  before its head (the head is the part other prompts share).

All methods run on the engine thread.
"""

from __future__ import annotations

import collections
import hashlib
from array import array


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of a full block: its parent's hash and its token ids (128-bit BLAKE2b: collisions, which
    would hand a sequence another prompt's KV, are out of reach, unlike Python's 64-bit ``hash``)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Reference-counted KV blocks ``0 .. num_blocks-1`` with an optional content-hash prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager: expected num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, bytes] = {}  # block -> content hash, for registered blocks
        self._block_of: dict[bytes, int] = {}  # content hash -> block
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found cached

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused when needed)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a content hash (held or free)."""
        return len(self._block_of)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (held once), the least recently freed first; a cached one loses its hash."""
        if n > len(self._free):
            raise RuntimeError(f"KV cache: asked for {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            content = self._hash_of.pop(block, None)
            if content is not None:
                del self._block_of[content]
            self.ref[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one hold on each block; unheld blocks become reusable, the last block of the list first."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self._free[block] = None
            elif self.ref[block] < 0:
                raise RuntimeError(f"KV cache: block {block} freed more often than it was taken")

    def acquire(self, blocks: list[int]) -> None:
        """Hold cached blocks (found by :meth:`match`) for one more sequence."""
        for block in blocks:
            if self.ref[block] == 0:
                del self._free[block]
            self.ref[block] += 1

    # ---- prefix cache -----------------------------------------------------------------------
    def hash_blocks(self, token_ids: list[int], hashes: list[bytes]) -> list[bytes]:
        """Extend ``hashes`` (a sequence's chain so far) to every full block of ``token_ids``."""
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            hashes.append(chain_hash(hashes[-1] if hashes else b"", token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match(self, hashes: list[bytes], max_blocks: int) -> list[int]:
        """Cached blocks for the longest prefix of ``hashes`` (at most ``max_blocks``): nothing is held yet."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for content in hashes[:max_blocks]:
            block = self._block_of.get(content)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count_free(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are free now (taking them back uses up free blocks)."""
        return sum(1 for block in blocks if self.ref[block] == 0)

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def register(self, block: int, content: bytes) -> None:
        """``block`` is full and computed and holds ``content``: later prompts may reuse it. When another
        block already holds the same content (two equal prompts computed at once), the first one stays."""
        if self.enable_prefix_caching and content not in self._block_of and block not in self._hash_of:
            self._block_of[content] = block
            self._hash_of[block] = content

    def reset_prefix_cache(self) -> None:
        """Forget every hash (blocks stay where they are)."""
        self._block_of.clear()
        self._hash_of.clear()
