"""Host-side planning of the CUDA attention kernels: launch geometry and per-step work lists.

Everything here is plain Python and numpy (no numba), so it is unit-tested on any host and runs
once per engine step, not once per layer. Each step's query rows are split by shape:
- decode rows (a sequence with exactly one query) go to the decode kernel, one work item per
  row; when rows x KV heads would leave SMs idle (small batch, long context) a row's keys are
  split into partitions (flash-decoding), each its own item writing a float32 partial, and a
  merge entry combines them;
- sequences with several queries (prefill, recompute, history prefill) go to the multi-query
  kernel in tiles of consecutive rows that fill its block; the grid is exactly the tile list.
Work lists are sorted longest first, so the longest blocks start early and the tail is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITEM = 5  # decode item: query row, sequence, first key, end key, partial slot (-1: final)
MERGE = 3  # merge entry: query row, first partial slot, number of slots
TILE = 4  # prefill tile: sequence, first query row, number of rows, keys to read
ELEMS_PER_WORD = {"float32": 1, "float16": 2, "bfloat16": 2}
REGISTER_FLOATS = 32  # per-thread query (and accumulator) floats a decode block may hold


@dataclass(frozen=True)
class LaunchConfig:
    """Launch knobs; tests shrink them so the CUDA simulator runs few threads and keys."""

    decode_threads: int = 128
    prefill_threads: int = 128
    chunk: int = 256  # decode: keys per softmax chunk (shared-memory logits)
    key_tile: int = 32  # multi-query: keys staged in shared memory per tile
    split_min_keys: int = 256  # a decode partition covers at least this many keys
    max_splits: int = 64
    waves: int = 2  # split decode rows until the grid has waves x SMs blocks
    sms: int | None = None  # streaming multiprocessors; None: ask the device


def words_per_row(fmt: str, head_dim: int) -> int:
    """32-bit words in one head's row of K, V, Q or the output."""
    return head_dim // ELEMS_PER_WORD[fmt]


def check_head_dim(fmt: str, head_dim: int) -> None:
    """The kernels load 16-byte vectors and give each lane one: rows of 16 to 512 bytes."""
    nbytes = head_dim * 4 // ELEMS_PER_WORD[fmt]
    if nbytes < 16 or nbytes > 512 or nbytes & (nbytes - 1) or head_dim % ELEMS_PER_WORD[fmt]:
        ok = [n * ELEMS_PER_WORD[fmt] // 4 for n in (16, 32, 64, 128, 256, 512)]
        raise ValueError(f"the CUDA kernels support head dim in {ok} for {fmt}, got {head_dim}")


def decode_rows(fmt: str, group: int) -> int:
    """Query heads per decode block: the most whose query and accumulator stay in registers."""
    return max(1, min(group, REGISTER_FLOATS // (4 * ELEMS_PER_WORD[fmt])))


@dataclass(frozen=True)
class PrefillGeometry:
    """How the multi-query kernel maps threads: `lanes` per (query, head) row."""

    words_per_lane: int
    lanes: int
    rows: int  # (query, head) rows per block
    heads: int  # query heads of the GQA group per block
    queries: int  # queries per tile
    slices: int  # blocks the group is split into


def prefill_geometry(fmt: str, head_dim: int, group: int, threads: int) -> PrefillGeometry:
    """Each lane owns 16 elements of a row (a 16-wide query slice and accumulator)."""
    wpr = words_per_row(fmt, head_dim)
    wl = min(wpr, 16 // ELEMS_PER_WORD[fmt])
    lanes = wpr // wl
    rows = threads // lanes
    if rows < 1 or threads % 32:
        raise ValueError(f"prefill_threads={threads} too few for head dim {head_dim}")
    heads = min(group, rows)
    return PrefillGeometry(wl, lanes, rows, heads, rows // heads, -(-group // heads))


@dataclass
class AttentionPlan:
    """One step's work lists (int32, rows of ITEM / MERGE / TILE ints)."""

    decode_items: np.ndarray
    merges: np.ndarray
    prefill_tiles: np.ndarray
    slots: int  # float32 partials the split decode rows need (per query head)
    decode_slices: int
    prefill_slices: int

    def packed(self) -> np.ndarray:
        """All three lists in one int32 buffer: one host-to-device copy per step."""
        return np.concatenate(
            [self.decode_items.ravel(), self.merges.ravel(), self.prefill_tiles.ravel()]
        ).astype(np.int32)


def plan_attention(
    query_start: list[int],
    positions: list[int],
    context_lens: list[int],
    *,
    fmt: str,
    head_dim: int,
    hkv: int,
    group: int,
    config: LaunchConfig,
    sms: int,
) -> AttentionPlan:
    """Work lists for one step; raises ValueError on metadata the kernels cannot serve."""
    qs = np.asarray(query_start, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64)
    ctx = np.asarray(context_lens, dtype=np.int64)
    nq = qs[1:] - qs[:-1]
    if len(qs) != len(ctx) + 1 or (len(qs) and (qs[0] != 0 or qs[-1] != len(pos))):
        raise ValueError("query_start must have B+1 entries from 0 to T")
    if (nq < 0).any() or (pos < 0).any():
        raise ValueError("query_start must not decrease and query_positions must be >= 0")
    if ((nq > 0) & (ctx <= 0)).any():
        raise ValueError("a sequence has queries but no context to attend to")
    owner = np.repeat(np.arange(len(ctx)), nq)
    lims = np.minimum(pos + 1, ctx[owner])  # keys each query row reads
    dec_seqs = np.flatnonzero(nq == 1)
    dec_rows = qs[dec_seqs]
    dec_slices = -(-group // decode_rows(fmt, group))
    geo = prefill_geometry(fmt, head_dim, group, config.prefill_threads)
    items, merges = _decode_items(dec_rows, dec_seqs, lims[dec_rows], hkv * dec_slices, config, sms)
    tiles = _prefill_tiles(qs, nq, lims, geo.queries)
    return AttentionPlan(
        decode_items=items,
        merges=merges,
        prefill_tiles=tiles,
        slots=int(merges[:, 2].sum()) if len(merges) else 0,
        decode_slices=dec_slices,
        prefill_slices=geo.slices,
    )


def _decode_items(
    rows: np.ndarray,
    seqs: np.ndarray,
    keys: np.ndarray,
    blocks_per_row: int,
    config: LaunchConfig,
    sms: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One item per decode row, or per partition of it when the grid would be too small."""
    want = 1
    if len(rows):
        want = max(1, -(-config.waves * sms // (len(rows) * blocks_per_row)))
    splits = np.clip(np.minimum(keys // max(1, config.split_min_keys), want), 1, config.max_splits)
    part = -(-keys // splits)
    part = -(-part // 16) * 16  # partitions start on 16-key boundaries
    splits = np.where(splits > 1, -(-keys // part), 1)
    items, merges, slot = [], [], 0
    for t, b, k, s, p in zip(rows, seqs, keys, splits, part, strict=True):
        if s == 1:
            items.append((t, b, 0, k, -1))
            continue
        items.extend((t, b, i * p, min(k, (i + 1) * p), slot + i) for i in range(s))
        merges.append((t, slot, s))
        slot += s
    items_arr = np.asarray(items, dtype=np.int32).reshape(-1, ITEM)
    order = np.argsort(-(items_arr[:, 3] - items_arr[:, 2]), kind="stable")
    return items_arr[order], np.asarray(merges, dtype=np.int32).reshape(-1, MERGE)


def _prefill_tiles(qs: np.ndarray, nq: np.ndarray, lims: np.ndarray, per_tile: int) -> np.ndarray:
    """Tiles of up to `per_tile` consecutive rows of one multi-query sequence."""
    tiles = []
    for b in np.flatnonzero(nq > 1):
        for lo in range(int(qs[b]), int(qs[b + 1]), per_tile):
            n = min(per_tile, int(qs[b + 1]) - lo)
            tiles.append((b, lo, n, int(lims[lo : lo + n].max())))
    arr = np.asarray(tiles, dtype=np.int32).reshape(-1, TILE)
    return arr[np.argsort(-arr[:, 3], kind="stable")]
