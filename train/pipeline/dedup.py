"""Exact and near-duplicate detection: content hashes, MinHash signatures (datasketch) split
into LSH bands, and the clusters of verified near-duplicate pairs.

A document's key is (file index, ordinal in its file): the order of the input. Within a group of
duplicates the document with the smallest key is kept, so the choice never depends on how work
was split between workers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

import numpy as np

Key = tuple[int, int]
_TOKEN = re.compile(r"\w+")


def content_hash(text: str) -> bytes:
  """SHA-256 of the (already normalised) text: equal hashes mean byte-equal documents."""
  return hashlib.sha256(text.encode("utf-8")).digest()


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band) that datasketch's `MinHashLSH` picks for this threshold, weighing
  false positives and false negatives equally."""
  from datasketch import MinHashLSH  # pylint: disable=import-outside-toplevel
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  return lsh.b, lsh.r


class MinHasher:
  """MinHash signatures of word n-gram shingles, with fixed permutations (from `seed`)."""

  def __init__(self, num_perm: int, ngram: int, seed: int):
    from datasketch import MinHash  # pylint: disable=import-outside-toplevel
    self._minhash = MinHash
    self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
    template = MinHash(num_perm=num_perm, seed=seed)
    self._permutations, self._scheme = template.permutations, template.scheme

  def shingles(self, text: str) -> set[bytes]:
    """Distinct word n-grams of the case-folded text (the whole text if it has fewer words)."""
    ws = _TOKEN.findall(text.casefold())
    n = min(self.ngram, len(ws))
    return {" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)} if ws else {b""}

  def signature(self, text: str) -> np.ndarray:
    """The MinHash values, uint32 [num_perm]."""
    m = self._minhash(num_perm=self.num_perm, seed=self.seed, permutations=self._permutations,
                      scheme=self._scheme)
    m.update_batch(sorted(self.shingles(text)))
    return m.hashvalues


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
  """One bucket key per band: the band index and its rows' hash values (little-endian)."""
  values = np.asarray(signature, dtype="<u4")
  return [b.to_bytes(4, "big") + values[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]


def similar_pairs(members: list[tuple[Key, np.ndarray]], threshold: float
                  ) -> Iterable[tuple[Key, Key]]:
  """Pairs (smaller key, larger key) of one LSH bucket whose estimated Jaccard similarity (the
  fraction of equal MinHash values) is at least `threshold`."""
  members = sorted(members, key=lambda m: m[0])
  for i, (a, sa) in enumerate(members):
    for b, sb in members[i + 1:]:
      if np.mean(sa == sb) >= threshold:
        yield a, b


def cluster_drops(edges: Iterable[tuple[Key, Key]]) -> dict[Key, Key]:
  """Connected components of the similarity graph (union-find): every member but the smallest
  key of its component -> that smallest key (the document kept)."""
  parent: dict[Key, Key] = {}

  def find(x: Key) -> Key:
    root = x
    while parent.get(root, root) != root:
      root = parent[root]
    while parent.get(x, x) != root:
      parent[x], x = root, parent[x]
    return root

  for a, b in edges:
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  return {x: find(x) for x in parent if find(x) != x}
