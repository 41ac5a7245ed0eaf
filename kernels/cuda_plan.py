"""Host-side planning of the CUDA attention kernels: launch geometry and per-step work lists.

Everything here is plain Python and numpy (no numba), so it is unit-tested on any host and runs
once per engine step, not once per layer. Each step's query rows are split by shape:
- decode rows (a sequence with exactly one query) go to the decode kernel, one work item per
  row; when rows x KV heads would leave SMs idle (small batch, long context) a row's keys are
  split into partitions (flash-decoding), each its own item writing a float32 partial, and a
  merge entry combines them;
- sequences with several queries (prefill, recompute, history prefill) go to the multi-query
  kernel in tiles of consecutive rows that fill its block; the grid is exactly the tile list.
  When tiles x KV heads would leave SMs idle (a short chunk over a long history: a 32-token
  turn after 4096 cached tokens is 12 blocks on 132 SMs) each tile's keys are split likewise,
  every (row, partition) writing a partial that the same merge kernel combines.
Work lists are sorted longest first, so the longest blocks start early and the tail is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ITEM = 5  # decode item: query row, sequence, first key, end key, partial slot (-1: final)
MERGE = 3  # merge entry: query row, first partial slot, number of slots
# prefill tile: sequence, first query row, number of rows, first key, end key, partial slot of
# its first row (-1: final), slot stride between rows (the tile's partitions)
TILE = 7
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
    slots: int  # float32 partials the split rows need (per query head)
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
    slots = int(merges[:, 2].sum()) if len(merges) else 0
    tiles = _prefill_tiles(qs, nq, lims, geo.queries)
    tiles, tile_merges = _split_tiles(tiles, hkv * geo.slices, config, sms, slots)
    slots += int(tile_merges[:, 2].sum()) if len(tile_merges) else 0
    return AttentionPlan(
        decode_items=items,
        merges=np.concatenate([merges, tile_merges]),
        prefill_tiles=tiles,
        slots=slots,
        decode_slices=dec_slices,
        prefill_slices=geo.slices,
    )


def _splits(keys: np.ndarray, work: int, blocks_per_work: int, config: LaunchConfig, sms: int):
    """(partitions, keys per partition) for each work unit: enough blocks for `waves` x SMs,
    each partition at least `split_min_keys` long and starting on a 16-key boundary."""
    want = 1
    if work:
        want = max(1, -(-config.waves * sms // (work * blocks_per_work)))
    splits = np.clip(np.minimum(keys // max(1, config.split_min_keys), want), 1, config.max_splits)
    part = -(-keys // splits)
    part = -(-part // 16) * 16
    return np.where(splits > 1, -(-keys // part), 1), part


def _decode_items(
    rows: np.ndarray,
    seqs: np.ndarray,
    keys: np.ndarray,
    blocks_per_row: int,
    config: LaunchConfig,
    sms: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One item per decode row, or per partition of it when the grid would be too small."""
    splits, part = _splits(keys, len(rows), blocks_per_row, config, sms)
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
            tiles.append((b, lo, n, 0, int(lims[lo : lo + n].max()), -1, 0))
    return np.asarray(tiles, dtype=np.int32).reshape(-1, TILE)


def _split_tiles(
    tiles: np.ndarray, blocks_per_tile: int, config: LaunchConfig, sms: int, slot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tiles split into key partitions when the grid would be too small; slots from `slot` on.

    Row i of a tile with s partitions keeps its partials in slots first + i*s .. + s - 1, so
    each row is one merge entry. Every partition starts at or before a row's causal limit
    except where the row has fewer keys: such a partial is empty (max -1e30, sum 0) and
    weighs nothing in the merge. Sorted by keys to read, longest first."""
    splits, part = _splits(tiles[:, 4], len(tiles), blocks_per_tile, config, sms)
    out, merges = [], []
    for (b, lo, n, _, end, _, _), s, p in zip(tiles.tolist(), splits, part, strict=True):
        if s == 1:
            out.append((b, lo, n, 0, end, -1, 0))
            continue
        out.extend((b, lo, n, i * p, min(end, (i + 1) * p), slot + i, s) for i in range(s))
        merges.extend((lo + i, slot + i * s, s) for i in range(n))
        slot += n * s
    arr = np.asarray(out, dtype=np.int32).reshape(-1, TILE)
    order = np.argsort(-(arr[:, 4] - arr[:, 3]), kind="stable")
    return arr[order], np.asarray(merges, dtype=np.int32).reshape(-1, MERGE)
