"""Which stored conversation a client that resends its history is continuing, found by hash.

A conversation is continued by a request that repeats its whole last prompt (a client resending
its history does), so each idle conversation is indexed under the hash of exactly that prefix:
(length, hash of tokens[:length]). A lookup hashes every prefix of the new prompt at once
(a polynomial hash mod 2**64, vectorized with numpy) and probes the indexed lengths, so a request
costs O(prompt length) whatever the number of stored conversations; candidates are then confirmed
token by token, so a hash collision can never hand a request another conversation.
"""

from __future__ import annotations

import numpy as np

_BASE = 0x9E3779B97F4A7C15  # odd, so it is invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 2**64)
MAX_CANDIDATES = 8  # confirmed per lookup; conversations with the same last prompt are alike


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


class PrefixIndex:
    def __init__(self) -> None:
        # (namespace, length) -> hash -> ids; a namespace (tenant) only ever sees its own
        self._by_length: dict[tuple[str, int], dict[int, dict[str, None]]] = {}
        self._keys: dict[str, tuple[tuple[str, int], int]] = {}
        self._powers = np.ones(1, dtype=np.uint64)
        self._inverse_powers = np.ones(1, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._keys)

    def _prefix_hashes(self, tokens: list[int]) -> np.ndarray:
        """h[k - 1] = hash of tokens[:k], for every k (sum of t_i * B**(k-1-i), mod 2**64)."""
        n = len(tokens)
        if len(self._powers) < n:
            self._extend(n)
        t = np.asarray(tokens, dtype=np.int64).astype(np.uint64) + np.uint64(1)
        with np.errstate(over="ignore"):
            return np.cumsum(t * self._inverse_powers[:n], dtype=np.uint64) * self._powers[:n]

    def _extend(self, n: int) -> None:
        size = max(n, 2 * len(self._powers))
        powers = np.empty(size, dtype=np.uint64)
        inverse = np.empty(size, dtype=np.uint64)
        p = q = 1
        for i in range(size):  # once per doubling: amortized O(1) a token
            powers[i], inverse[i] = p, q
            p, q = (p * _BASE) % 2**64, (q * _BASE_INV) % 2**64
        self._powers, self._inverse_powers = powers, inverse

    def add(self, cid: str, tokens: list[int], prompt_len: int, namespace: str = "") -> None:
        """Index a conversation under its last prompt, tokens[:prompt_len]."""
        self.remove(cid)
        if prompt_len <= 0 or prompt_len > len(tokens):
            return
        key = ((namespace, prompt_len), int(self._prefix_hashes(tokens[:prompt_len])[-1]))
        self._by_length.setdefault(key[0], {}).setdefault(key[1], {})[cid] = None
        self._keys[cid] = key

    def remove(self, cid: str) -> None:
        key = self._keys.pop(cid, None)
        if key is None:
            return
        by_hash = self._by_length[key[0]]
        ids = by_hash[key[1]]
        del ids[cid]
        if not ids:
            del by_hash[key[1]]
            if not by_hash:
                del self._by_length[key[0]]

    def candidates(self, prompt: list[int], namespace: str = "") -> list[tuple[str, int]]:
        """(conversation id, indexed length) whose indexed prefix hashes like a prefix of
        `prompt`, longest first, at most MAX_CANDIDATES. Callers confirm by comparing tokens."""
        if not self._keys or not prompt:
            return []
        hashes = self._prefix_hashes(prompt)
        found: list[tuple[str, int]] = []
        for length in range(len(prompt), 0, -1):
            by_hash = self._by_length.get((namespace, length))
            ids = by_hash.get(int(hashes[length - 1])) if by_hash else None
            if ids:
                found += [(cid, length) for cid in reversed(ids)]  # newest first
                if len(found) >= MAX_CANDIDATES:
                    break
        return found[:MAX_CANDIDATES]
