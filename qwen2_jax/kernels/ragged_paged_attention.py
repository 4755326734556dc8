"""Ragged paged attention for continuous batching: one step's queries against a paged KV cache.

One call serves a mix of sequences: single-token decodes and prefill chunks, concatenated along
the token axis, each reading its keys and values from a shared page pool through a block table.

Shapes (S sequence slots, T query-token budget, H query heads, K kv heads, G = H // K, D head
size, P pages in the pool, ps tokens per page, pps pages per sequence):
  q             [T, H, D]        the step's query tokens, sequences concatenated; tokens at or
                                 past cu_q_lens[num_seqs] are padding (their output rows are 0).
  k_pages       [P, K, ps, D]    one layer's key pool (v_pages the same), compute dtype; a page
                                 holds each kv head's ps tokens contiguously ([ps, D] tiles).
  kv_lens       [S] int32        tokens in sequence i's cache, this step's tokens included.
  page_indices  [S, pps] int32   block table: page j of seq i holds its tokens [j*ps, (j+1)*ps);
                                 entries past a sequence's used pages are never read into results.
  cu_q_lens     [S + 1] int32    seq i's queries are q[cu_q_lens[i]:cu_q_lens[i + 1]] (q_len_i of
                                 them, possibly 0); they are its last q_len_i tokens.
  num_seqs      [1] or [] int32  slots >= num_seqs are ignored.

Masking: query t of seq i sits at position p = kv_lens[i] - q_len_i + t and sees cache positions
j with j <= p (and p - j < sliding_window when a window is set). Query head h uses kv head h // G.

The Pallas TPU kernel works on "items": one item is up to `block_q` consecutive queries of one
sequence. The wrapper lists the items of this step (at most S + cdiv(T, block_q) of them; a
one-token decode is one item) in scalar-prefetched tables and lays the queries out per item and
kv head as [items, K, block_q * G, D] (rows are (token, query head) pairs, so a kv head's G query
heads share one matmul and K/V are never repeated). The grid runs over items; inside an item a
loop walks the kv blocks (`pages_per_block` pages) that hold a visible key, copying their pages
from HBM with async copies, double-buffered across blocks and across items; pages wholly outside
[first visible key, last query position] are never copied. Online softmax in f32, one running
(max, sum, accumulator) per kv head. Results come back per item and are gathered to [T, H, D].

Off TPU the engine runs `ragged_paged_attention_cpu` on the CPU backend (a C++ XLA FFI call,
`cpu_attention.cc`: float32, items of up to 16 queries per kv head walking their keys 16 at a
time straight from the pool pages) or else `ragged_paged_attention_blocked`: the same items in
plain jnp, looping over blocks of pages with an online softmax (block-major in decode steps;
over the (item, block) pairs each item sees in steps with prompt chunks). Both can take the
step's own keys / values as arguments, so the pools may be written after them.
`ragged_paged_attention_reference` (per-token gathers) is the oracle both are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from qwen2_jax.errors import UserError
from qwen2_jax.kernels import cpu_extension, on_platform

Array = jax.Array

# The reference gathers K and V for this many (token, cache position, kv head, D) elements at a
# time: tokens are processed in chunks so memory stays bounded for long caches.
_REF_CHUNK_ELEMENTS = 1 << 22


def gather_pages(pool: Array, pages: Array) -> Array:
  """The keys (or values) of block tables `pages` [..., pps] from a pool [P, K, ps, D], token-major:
  [..., pps * ps, K, D]."""
  g = pool[pages]  # [..., pps, K, ps, D]
  g = jnp.swapaxes(g, -3, -2)  # [..., pps, ps, K, D]
  return g.reshape(*pages.shape[:-1], pages.shape[-1] * pool.shape[2], pool.shape[1],
                   pool.shape[3])


def _token_seq_map(cu_q_lens: Array, num_seqs: Array, t: int) -> tuple[Array, Array, Array]:
  """(seq id [T], index within its seq's queries [T], valid [T]) for every query token."""
  s = cu_q_lens.shape[0] - 1
  n = jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32)
  tok = jnp.arange(t, dtype=jnp.int32)
  live = jnp.arange(s, dtype=jnp.int32) < n  # [S]
  # seq of token t: how many live seqs end at or before t (empty seqs end where they start).
  ends = cu_q_lens[1:]
  seq = jnp.sum(live[None, :] & (ends[None, :] <= tok[:, None]), axis=1).astype(jnp.int32)
  valid = tok < cu_q_lens[n]
  seq = jnp.where(valid, seq, 0)
  return seq, tok - cu_q_lens[seq], valid


def ragged_paged_attention_reference(q: Array, k_pages: Array, v_pages: Array, kv_lens: Array,
                                     page_indices: Array, cu_q_lens: Array, num_seqs: Array, *,
                                     scale: float,
                                     sliding_window: int | Array | None = None) -> Array:
  """Ragged paged attention in plain jnp (f32 math): the test oracle (the CPU path is
  `ragged_paged_attention_blocked`).

  Each query token gathers its sequence's pages ([pps * ps, K, D]) and attends over them with the
  causal / window mask; tokens are handled in chunks so at most about 4M elements of K (and of V)
  are gathered at once. Shapes and masking as in the module docstring; `sliding_window` is None,
  an int or an int32 scalar array.

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are 0.
  """
  t, h, d = q.shape
  _, kh, ps, _ = k_pages.shape
  pps = page_indices.shape[1]
  g = h // kh
  length = pps * ps
  seq, idx, valid = _token_seq_map(cu_q_lens, num_seqs, t)
  q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
  pos = kv_lens[seq] - q_lens[seq] + idx  # [T] position of each query in its sequence
  chunk = max(1, min(t, _REF_CHUNK_ELEMENTS // (length * kh * d)))
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  qf = jnp.pad(q.astype(jnp.float32), ((0, pad), (0, 0), (0, 0)))
  qf = qf.reshape(n_chunks, chunk, kh, g, d)  # [N, C, K, G, D]
  seq_c = jnp.pad(seq, (0, pad)).reshape(n_chunks, chunk)
  pos_c = jnp.pad(pos, (0, pad)).reshape(n_chunks, chunk)
  valid_c = jnp.pad(valid, (0, pad)).reshape(n_chunks, chunk)
  kv_pos = jnp.arange(length, dtype=jnp.int32)

  def one_chunk(args):
    qc, sc, pc, vc = args  # [C, K, G, D], [C], [C], [C]
    pages = page_indices[sc]  # [C, pps]
    k = gather_pages(k_pages, pages).astype(jnp.float32)  # [C, L, K, D]
    v = gather_pages(v_pages, pages).astype(jnp.float32)
    logits = jnp.einsum("CKGD,CLKD->CKGL", qc, k, precision=lax.Precision.HIGHEST) * scale
    mask = (kv_pos[None, :] <= pc[:, None]) & vc[:, None]  # [C, L]
    if sliding_window is not None:
      mask &= pc[:, None] - kv_pos[None, :] < sliding_window
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    v = jnp.where(mask[:, :, None, None], v, 0.0)  # unread cache slots may hold anything
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # masked keys: exactly 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("CKGL,CLKD->CKGD", p, v, precision=lax.Precision.HIGHEST)

  out = lax.map(one_chunk, (qf, seq_c, pos_c, valid_c))  # [N, C, K, G, D]
  return out.reshape(n_chunks * chunk, h, d)[:t].astype(q.dtype)


def _default_cpu_block_q(t: int, s: int) -> int:
  """Queries per item of the blocked CPU path: 1 for a step of at most one token per sequence
  (T <= S), else 8 (at most T). Every item computes block_q queries, so in a mixed step each
  decode token costs block_q rows: 8 was the fastest of 4 / 8 / 16 / 32 for 256- and 512-token
  steps of 15 decodes and one prompt chunk at Qwen2-0.5B shapes on a 2-core CPU."""
  return 1 if t <= s else min(t, 8)


def ragged_paged_attention_blocked(q: Array, k_pages: Array, v_pages: Array, kv_lens: Array,
                                   page_indices: Array, cu_q_lens: Array, num_seqs: Array, *,
                                   scale: float, sliding_window: int | Array | None = None,
                                   k_new: Array | None = None, v_new: Array | None = None,
                                   block_q: int | None = None,
                                   pages_per_block: int | None = None,
                                   pairs_per_iter: int = 32) -> Array:
  """Ragged paged attention in plain jnp by items of queries and blocks of keys: the CPU path.

  As the Pallas kernel, the step is cut into items of up to `block_q` consecutive queries of one
  sequence (at most min(T, S + cdiv(T, block_q)) items), and each item's keys into blocks of
  `pages_per_block` pages, merged by an online softmax (f32). K/V are read once per item, never
  materialised whole, and only blocks up to the last one some query sees are visited (traced
  trip counts). Two loops, chosen by the step's shape:
  - steps of at most S tokens (decodes; one query per item at the default block_q):
    block-major, every iteration gathers one block of every item's pages and attends as one
    batched matmul per kv head, until the step's longest sequence ends;
  - steps with prompt chunks: the (item, block) pairs each item sees (from its window's start to
    its last query) are listed item-major, and an iteration takes `pairs_per_iter` of them,
    wherever they belong, merging each into its item's softmax state; so a chunk's first items
    do not pay for its last ones, nor short sequences for the longest.
  Equal to the reference up to float rounding. (Measured inside a Qwen2-0.5B step on a 2-core
  CPU: the pair loop cut a 512-token mixed step by ~0.3 s of ~3.5 s but made 16-row decode
  steps ~10 ms slower than the block-major one, hence the two.)

  Args:
    q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs: as in the module docstring.
    scale: logit multiplier; sliding_window: None, an int or an int32 scalar array.
    k_new, v_new: optional [T, K, D]: this step's keys / values, token-aligned with q. When given,
      positions [kv_len - q_len, kv_len) of each sequence are read from them instead of the
      pools, which then need not hold them yet (the caller may write the pools afterwards).
    block_q: queries per item; default `_default_cpu_block_q` (1 for decode steps, else 8).
    pages_per_block: pages per key block; default 8 for decode steps, else 4.
    pairs_per_iter: (item, block) pairs per iteration of the pair loop (more: fewer iterations,
      larger gathers, more padding pairs in the last one).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are 0.
  """
  t, h, d = q.shape
  _, kh, ps, _ = k_pages.shape
  s, pps = page_indices.shape
  g = h // kh
  block_q = _default_cpu_block_q(t, s) if block_q is None else max(1, min(int(block_q), t))
  rows = block_q * g
  n_items = min(t, s + -(-t // block_q))
  decode = t <= s
  if pages_per_block is None:
    pages_per_block = 8 if decode else 4
  pb = max(1, min(int(pages_per_block), pps))
  n_blocks = -(-pps // pb)
  width = pb * ps  # keys per block
  c = max(1, int(pairs_per_iter))
  cu_q_lens = cu_q_lens.astype(jnp.int32)
  kv_lens = kv_lens.astype(jnp.int32)
  window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32).reshape(())
  table, _, starts = _item_tables(cu_q_lens, kv_lens, num_seqs, n_items=n_items,
                                  block_q=block_q, block_kv=width, sliding_window=window)
  field = lambda f: table[f * n_items:(f + 1) * n_items]
  seq, base, lo, hi = field(_SEQ), field(_BASE), field(_LO), field(_HI)  # dead items: all 0
  b0, nb = field(_B0), field(_NB)  # each item sees key blocks [b0, b0 + nb)
  m = jnp.arange(n_items, dtype=jnp.int32)
  first_q = cu_q_lens[seq] + (m - starts[seq]) * block_q  # [N] token index of the first query
  tok = jnp.minimum(first_q[:, None] + jnp.arange(block_q, dtype=jnp.int32)[None, :], t - 1)
  qi = q[tok].astype(jnp.float32).reshape(n_items, block_q, kh, g, d)
  qi = qi.transpose(0, 2, 1, 3, 4).reshape(n_items, kh, rows, d) * scale  # [N, K, R, D]
  pages = page_indices.astype(jnp.int32)[seq]  # [N, pps]
  pages = jnp.pad(pages, ((0, 0), (0, n_blocks * pb - pps)))  # padded pages: never visible
  pages = pages.reshape(n_items, n_blocks, pb)
  pos = base[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :] // g  # [N, R]
  if k_new is not None:
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    new_from = kv_lens[seq] - q_lens[seq]  # [N] first position held by k_new / v_new
    new_src = cu_q_lens[seq] - new_from  # token index of position p: p + new_src
    k_new, v_new = k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype)
  if decode:
    out = _block_major_loop(qi, k_pages, v_pages, pages, pos, lo, hi, k_new, v_new,
                            (new_from, new_src) if k_new is not None else None, window)
  else:
    out = _pair_loop(qi, k_pages, v_pages, pages, pos, lo, hi, b0, nb, k_new, v_new,
                     (new_from, new_src) if k_new is not None else None, window, c)
  out = out.reshape(n_items, kh, block_q, g, d).transpose(0, 2, 1, 3, 4)
  out = out.reshape(n_items * block_q, h, d)  # row item * block_q + i: i-th query of the item
  tok_seq, idx, valid = _token_seq_map(cu_q_lens, num_seqs, t)
  row = (starts[tok_seq] + idx // block_q) * block_q + idx % block_q
  return jnp.where(valid[:, None, None], out[jnp.where(valid, row, 0)], 0).astype(q.dtype)


def cpu_kernel_applies(q: Array, k_pages: Array, v_pages: Array) -> bool:
  """Whether `ragged_paged_attention_cpu` can run here (`cpu_extension.runs_here`) on these
  operands: q and the pools are float32."""
  return (cpu_extension.runs_here()
          and all(x.dtype == jnp.float32 for x in (q, k_pages, v_pages)))


def ragged_paged_attention_cpu(q: Array, k_pages: Array, v_pages: Array, kv_lens: Array,
                               page_indices: Array, cu_q_lens: Array, num_seqs: Array, *,
                               scale: float, sliding_window: int | Array | None = None,
                               k_new: Array | None = None, v_new: Array | None = None) -> Array:
  """Ragged paged attention as a C++ XLA FFI call on the CPU backend (`cpu_attention.cc`), fp32.

  The arguments and result are those of `ragged_paged_attention_blocked`, with f32 q and pools.
  Each (item of up to 16 queries of one sequence, kv head) walks its visible keys once, 16 at a
  time, straight from the pool pages (or k_new / v_new for this step's positions), with an
  online softmax; items and heads are split over XLA's intra-op threads. On a 2-core AVX-512
  Xeon (2026-12-05) one layer of a Qwen2-0.5B 16-sequence decode step took 0.43-0.48 ms against
  1.9-2.1 ms for the blocked path, and the Engine's decode step went from 153 to 137 ms
  (docs/benchmarks.md). Malformed metadata is a runtime error, never a read out of bounds.
  """
  if not cpu_extension.available():
    raise cpu_extension.missing("ragged_paged_attention_cpu")
  if q.dtype != jnp.float32 or k_pages.dtype != jnp.float32 or v_pages.dtype != jnp.float32:
    raise TypeError(f"ragged_paged_attention_cpu: float32 only, got q {q.dtype}, pools "
                    f"{k_pages.dtype}")
  _check(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, sliding_window)
  t, _, d = q.shape
  kh = k_pages.shape[1]
  if k_new is None:  # every key from the pools
    k_new = v_new = jnp.zeros((0, kh, d), jnp.float32)
  no_window = np.iinfo(np.int32).max  # every position is fewer than this behind any query
  window = jnp.asarray(no_window if sliding_window is None else sliding_window,
                       jnp.int32).reshape(1)
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  return jax.ffi.ffi_call(cpu_extension.ATTENTION_TARGET, out)(
      q, k_pages, v_pages, i32(kv_lens), i32(page_indices), i32(cu_q_lens),
      i32(num_seqs).reshape(1), window, k_new.astype(jnp.float32), v_new.astype(jnp.float32),
      scale=np.float32(scale))


def _block_keys(k_pages, v_pages, pg, col, k_new, v_new, new_at, lo, hi):
  """K, V [C, K, W, D] of blocks of pages pg [C, pb] at positions col [C, W] (the step's own
  positions from k_new / v_new where given), V zero outside [lo, hi) so that p = 0 times an
  unowned slot (which may hold NaN) stays 0; and that in-range mask [C, W]."""
  c, pb = pg.shape
  _, kh, ps, d = k_pages.shape
  k = k_pages[pg].transpose(0, 2, 1, 3, 4).reshape(c, kh, pb * ps, d)
  v = v_pages[pg].transpose(0, 2, 1, 3, 4).reshape(c, kh, pb * ps, d)
  if k_new is not None:
    new_from, new_src = new_at  # [C] first position held by k_new; token of position p: p + src
    is_new = (col >= new_from[:, None])[:, None, :, None]  # [C, 1, W, 1]
    src = jnp.clip(col + new_src[:, None], 0, k_new.shape[0] - 1)  # [C, W]
    k = jnp.where(is_new, k_new[src].transpose(0, 2, 1, 3), k)
    v = jnp.where(is_new, v_new[src].transpose(0, 2, 1, 3), v)
  in_range = (col >= lo[:, None]) & (col < hi[:, None])  # [C, W]
  v = jnp.where(in_range[:, None, :, None], v, 0).astype(jnp.float32)
  return k.astype(jnp.float32), v, in_range


def _block_scores(qi, k, pos, col, in_range, window):
  """Masked logits [C, K, R, W] of queries qi [C, K, R, D] (positions pos [C, R]) against k."""
  logits = jnp.einsum("CKRD,CKWD->CKRW", qi, k, precision=lax.Precision.HIGHEST)
  mask = (col[:, None, :] <= pos[:, :, None]) & in_range[:, None, :]  # [C, R, W]
  if window is not None:
    mask &= pos[:, :, None] - col[:, None, :] < window
  return jnp.where(mask[:, None], logits, -jnp.inf)


def _block_major_loop(qi, k_pages, v_pages, pages, pos, lo, hi, k_new, v_new, new_at, window):
  """Decode steps: iteration i attends every item to its i-th block; [N, K, R, D]."""
  n_items, kh, rows, d = qi.shape
  _, n_blocks, pb = pages.shape
  width = pb * k_pages.shape[2]

  def block(i, carry):
    run_max, run_sum, acc = carry  # [N, K, R], [N, K, R], [N, K, R, D]
    col = jnp.broadcast_to(i * width + jnp.arange(width, dtype=jnp.int32), (n_items, width))
    k, v, in_range = _block_keys(k_pages, v_pages, pages[:, i], col, k_new, v_new, new_at, lo,
                                 hi)
    logits = _block_scores(qi, k, pos, col, in_range, window)
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no key yet: -inf - 0, p = 0
    p = jnp.exp(logits - shift[..., None])
    rescale = jnp.exp(run_max - shift)
    run_sum = run_sum * rescale + jnp.sum(p, axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("CKRW,CKWD->CKRD", p, v,
                                                precision=lax.Precision.HIGHEST)
    return new_max, run_sum, acc

  live_blocks = jnp.minimum((jnp.max(hi) + width - 1) // width, n_blocks)
  init = (jnp.full((n_items, kh, rows), -jnp.inf, jnp.float32),
          jnp.zeros((n_items, kh, rows), jnp.float32),
          jnp.zeros((n_items, kh, rows, d), jnp.float32))
  _, run_sum, acc = lax.fori_loop(0, live_blocks, block, init)
  return acc / jnp.where(run_sum > 0, run_sum, 1.0)[..., None]


def _pair_loop(qi, k_pages, v_pages, pages, pos, lo, hi, b0, nb, k_new, v_new, new_at, window,
               c):
  """Steps with prompt chunks: iterations over the listed (item, block) pairs; [N, K, R, D]."""
  n_items, kh, rows, d = qi.shape
  _, n_blocks, pb = pages.shape
  width = pb * k_pages.shape[2]
  # The pair list, item-major, padded to whole iterations; it depends only on the step's
  # metadata and the window, so XLA can share it between unrolled layers of the same window.
  ends = jnp.cumsum(nb)  # [N] pairs of items 0..n; item n's pairs are [ends - nb, ends)
  n_pairs = ends[-1]
  max_pairs = -(-n_items * n_blocks // c) * c
  pair = jnp.arange(max_pairs, dtype=jnp.int32)
  pair_item = jnp.minimum(jnp.searchsorted(ends, pair, side="right"), n_items - 1)
  pair_live = pair < n_pairs
  pair_blk = jnp.clip(b0[pair_item] + pair - (ends - nb)[pair_item], 0, n_blocks - 1)
  pair_pages = pages[pair_item, pair_blk]  # [max_pairs, pb]
  pair_item = pair_item.astype(jnp.int32)

  def chunk(i, carry):
    run_max, run_sum, acc = carry  # [N + 1, K, R], [N + 1, K, R], [N + 1, K, R, D]; row N: spill
    take = lambda x: lax.dynamic_slice_in_dim(x, i * c, c)
    it, live, blk, pg = take(pair_item), take(pair_live), take(pair_blk), take(pair_pages)
    col = blk[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]  # [C, W]
    at = None if new_at is None else (new_at[0][it], new_at[1][it])
    k, v, in_range = _block_keys(k_pages, v_pages, pg, col, k_new, v_new, at,
                                 jnp.where(live, lo[it], 0), jnp.where(live, hi[it], 0))
    logits = _block_scores(qi[it], k, pos[it], col, in_range, window)
    pair_max = jnp.max(logits, axis=-1)  # [C, K, R]; -inf where a row sees no key of the block
    p = jnp.exp(logits - jnp.where(jnp.isfinite(pair_max), pair_max, 0.0)[..., None])
    pair_sum = jnp.sum(p, axis=-1)
    pair_acc = jnp.einsum("CKRW,CKWD->CKRD", p, v, precision=lax.Precision.HIGHEST)
    dst = jnp.where(live, it, n_items)  # padding pairs spill into row N
    new_max = run_max.at[dst].max(pair_max)
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # no key yet: exp(-inf - 0) = 0
    rescale = jnp.exp(run_max - shift)
    weight = jnp.exp(pair_max - shift[dst])
    run_sum = (run_sum * rescale).at[dst].add(pair_sum * weight)
    acc = (acc * rescale[..., None]).at[dst].add(pair_acc * weight[..., None])
    return new_max, run_sum, acc

  init = (jnp.full((n_items + 1, kh, rows), -jnp.inf, jnp.float32),
          jnp.zeros((n_items + 1, kh, rows), jnp.float32),
          jnp.zeros((n_items + 1, kh, rows, d), jnp.float32))
  _, run_sum, acc = lax.fori_loop(0, (n_pairs + c - 1) // c, chunk, init)
  return acc[:n_items] / jnp.where(run_sum[:n_items] > 0, run_sum[:n_items], 1.0)[..., None]


# ------------------------------------------------------------------------------ Pallas kernel

_MASK = -0.7 * float(np.finfo(np.float32).max)  # initial running max: finite, so no inf - inf
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
# Per-item table rows (scalar-prefetched as one flat int32 array, row f at [f * N, (f + 1) * N)).
_SEQ, _BASE, _LO, _HI, _B0, _NB, _OFF, _FIELDS = range(8)


class RaggedPagedAttentionError(UserError, ValueError):
  """Inconsistent shapes or block sizes; the message names the parameter."""


def _check(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, sliding_window) -> None:
  t, h, d = q.shape
  _, kh, _, dk = k_pages.shape
  s = page_indices.shape[0]
  if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or dk != d:
    raise RaggedPagedAttentionError(
        f"k_pages / v_pages must both be [P, K, page_size, D={d}], got {k_pages.shape} and "
        f"{v_pages.shape}")
  if h % kh:
    raise RaggedPagedAttentionError(f"q heads {h} are not a multiple of kv heads {kh}")
  if kv_lens.shape != (s,) or cu_q_lens.shape != (s + 1,):
    raise RaggedPagedAttentionError(
        f"kv_lens must be [S={s}] and cu_q_lens [S + 1], got {kv_lens.shape} and "
        f"{cu_q_lens.shape}")
  if isinstance(sliding_window, int) and sliding_window <= 0:
    raise RaggedPagedAttentionError(f"sliding_window must be positive, got {sliding_window}")


def _item_tables(cu_q_lens, kv_lens, num_seqs, *, n_items: int, block_q: int, block_kv: int,
                 sliding_window: Array | None):
  """(per-item table [_FIELDS * N] int32, live items [1], first item of each sequence [S])."""
  s = kv_lens.shape[0]
  n = jnp.reshape(num_seqs, (-1,))[0].astype(jnp.int32)
  live = jnp.arange(s) < n
  q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S]
  blocks = -(-q_lens // block_q)  # [S] items per sequence
  ends = jnp.cumsum(blocks)  # [S] inclusive
  starts = ends - blocks
  n_live = ends[-1]
  m = jnp.arange(n_items, dtype=jnp.int32)
  seq = jnp.minimum(jnp.sum(ends[None, :] <= m[:, None], axis=1), s - 1).astype(jnp.int32)
  item_live = m < n_live
  qs = (m - starts[seq]) * block_q  # first query of the item within its sequence
  nq = jnp.clip(q_lens[seq] - qs, 0, block_q)
  base = kv_lens[seq] - q_lens[seq] + qs  # position of the item's first query
  hi = base + nq  # keys at positions >= hi are seen by no query of the item
  lo = jnp.zeros_like(base) if sliding_window is None else jnp.maximum(
      base - sliding_window + 1, 0)
  b0 = lo // block_kv
  nb = jnp.where(item_live & (nq > 0), jnp.maximum(-(-hi // block_kv) - b0, 0), 0)
  off = jnp.cumsum(nb) - nb  # kv blocks of all earlier items: the double-buffer slot parity
  fields = [seq, base, lo, hi, b0, nb, off]
  table = jnp.stack([jnp.where(item_live, f, 0) for f in fields]).astype(jnp.int32).reshape(-1)
  return table, n_live.reshape(1).astype(jnp.int32), starts


def _kernel(table_ref, pages_ref, scalars_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems,
            m_scr, l_scr, acc_scr, *, scale: float, windowed: bool, groups: int,
            page_size: int, pages_per_block: int, pages_per_seq: int, n_items: int):
  """One item: q_ref / o_ref [K, R, D] (R >= block_q * G rows: row r = token r // G, head r % G)."""
  item = pl.program_id(0)
  n_live, window = scalars_ref[0], scalars_ref[1]  # live items; sliding window (if windowed)
  kh = k_buf.shape[2]
  rows = q_ref.shape[1]
  block_kv = pages_per_block * page_size
  field = lambda f, i: table_ref[f * n_items + i]

  def page_copies(i, blk, slot, p):
    """(needed, k copy, v copy) of page p of item i's kv block blk, into buffer `slot`."""
    seq, lo, hi = field(_SEQ, i), field(_LO, i), field(_HI, i)
    page = blk * pages_per_block + p
    needed = (page < pages_per_seq) & (page * page_size < hi) & ((page + 1) * page_size > lo)
    src = pages_ref[seq * pages_per_seq + jnp.minimum(page, pages_per_seq - 1)]
    return (needed,
            pltpu.make_async_copy(k_hbm.at[src], k_buf.at[slot, p], sems.at[slot, 0]),
            pltpu.make_async_copy(v_hbm.at[src], v_buf.at[slot, p], sems.at[slot, 1]))

  def for_pages(i, blk, slot, action):
    """Starts or waits for the copies of the pages of a kv block that hold a needed key."""
    def body(p, carry):
      needed, kc, vc = page_copies(i, blk, slot, p)

      @pl.when(needed)
      def _():
        getattr(kc, action)()
        getattr(vc, action)()
      return carry

    lax.fori_loop(0, pages_per_block, body, 0)

  start = lambda i, blk, slot: for_pages(i, blk, slot, "start")
  wait = lambda i, blk, slot: for_pages(i, blk, slot, "wait")

  @pl.when(item < n_live)
  def _item():
    base, lo, hi = field(_BASE, item), field(_LO, item), field(_HI, item)
    b0, nb, off = field(_B0, item), field(_NB, item), field(_OFF, item)
    m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    # The previous item prefetched this one's first block unless it had no blocks itself.
    prefetched = (item > 0) & (field(_NB, jnp.maximum(item - 1, 0)) > 0)

    @pl.when(jnp.logical_not(prefetched) & (nb > 0))
    def _first():
      start(item, b0, off & 1)

    def block(j, carry):
      blk, slot = b0 + j, (off + j) & 1  # (no // or % here: Mosaic's sign needs a TPU)
      wait(item, blk, slot)

      @pl.when(j + 1 < nb)
      def _next_block():
        start(item, blk + 1, 1 - slot)

      @pl.when((j + 1 == nb) & (item + 1 < n_live) & (field(_NB, item + 1) > 0))
      def _next_item():
        start(item + 1, field(_B0, item + 1), 1 - slot)

      c0 = blk * block_kv
      # Blocks whose keys every query of the item sees (all in [lo, base], and within the
      # window of the last query) skip the masks: padding rows then attend to real keys too, and
      # are dropped. Other blocks mask logits and zero V rows outside [lo, hi), which may hold
      # stale or never-written data.
      full = (c0 >= lo) & (c0 + block_kv <= base + 1)
      if windowed:
        full &= hi - 1 - c0 < window

      def update(masked: bool):
        if masked:
          shape = (rows, block_kv)
          col = c0 + lax.broadcasted_iota(jnp.int32, shape, 1)
          pos = base + lax.div(lax.broadcasted_iota(jnp.int32, shape, 0), jnp.int32(groups))
          visible = (col <= pos) & (col >= lo) & (col < hi)
          if windowed:
            visible &= pos - col < window
          v_row = c0 + lax.broadcasted_iota(jnp.int32, (block_kv, v_buf.shape[-1]), 0)
          v_ok = (v_row >= lo) & (v_row < hi)
        for h in range(kh):
          k = k_buf[slot, :, h].reshape(block_kv, -1)  # [B, D]
          v = v_buf[slot, :, h].reshape(block_kv, -1)
          s = lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32) * scale
          if masked:
            v = jnp.where(v_ok, v, jnp.zeros_like(v))
            s = jnp.where(visible, s, -jnp.inf)  # [R, B]
          m_prev = m_scr[h]  # [R, 1]
          m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
          alpha = jnp.exp(m_prev - m_next)
          p = jnp.exp(s - m_next)
          l_scr[h] = alpha * l_scr[h] + jnp.sum(p, axis=1, keepdims=True)
          m_scr[h] = m_next
          acc_scr[h] = alpha * acc_scr[h] + jnp.dot(p.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)

      pl.when(full)(lambda: update(False))
      pl.when(jnp.logical_not(full))(lambda: update(True))
      return carry

    lax.fori_loop(0, nb, block, 0)
    for h in range(kh):
      l = l_scr[h]
      o_ref[h] = (acc_scr[h] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _vmem_limit(rows: int, block_kv: int, kh: int, d: int, itemsize: int) -> int:
  """Scoped VMEM with headroom: double-buffered q / out blocks and K / V pages, f32 state and
  score temporaries; at least 32 MiB, at most 60 MiB (every supported chip has >= 64 MiB)."""
  blocks = 2 * 2 * kh * rows * d * itemsize + 2 * 2 * block_kv * kh * d * itemsize
  state = kh * rows * (d + 2 * 128) * 4
  temps = 6 * rows * block_kv * 4
  return int(min(max(1.5 * (blocks + state + temps), 32 << 20), 60 << 20))


def _default_block_q(groups: int, t: int) -> int:
  """Queries per item: about 128 (token, head) rows per kv head, at most the token budget."""
  return max(1, min(t, -(-128 // groups)))


def ragged_paged_attention(q: Array, k_pages: Array, v_pages: Array, kv_lens: Array,
                           page_indices: Array, cu_q_lens: Array, num_seqs: Array, *,
                           scale: float, sliding_window: int | Array | None = None,
                           interpret=False, block_q: int | None = None,
                           pages_per_block: int | None = None) -> Array:
  """Ragged paged attention as a Pallas TPU kernel (shapes and masking: the module docstring).

  Args:
    q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs: as in the module docstring.
      q and the pages share one dtype (bf16 or f32); accumulation is f32.
    scale: logit multiplier (typically D ** -0.5).
    sliding_window: None, or a positive int or int32 scalar array (may be traced): a query at
      position p sees keys at positions > p - sliding_window only.
    interpret: False: the Mosaic TPU kernel; True (or `pltpu.InterpretParams`): the Pallas
      interpreter on any backend; None: chosen when lowering (Mosaic for TPU, else interpreter).
    block_q: queries of one sequence per kernel item; default ceil(128 / G), at most T.
    pages_per_block: pages per kv block (one loop step); default 256 // page_size, at least 1,
      at most pages_per_seq.

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are 0.
  """
  _check(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, sliding_window)
  t, h, d = q.shape
  _, kh, page_size, _ = k_pages.shape
  s, pages_per_seq = page_indices.shape
  g = h // kh
  block_q = _default_block_q(g, t) if block_q is None else int(block_q)
  if pages_per_block is None:
    pages_per_block = max(1, 256 // page_size)
  pages_per_block = min(int(pages_per_block), pages_per_seq)
  if block_q < 1 or pages_per_block < 1:
    raise RaggedPagedAttentionError(
        f"block_q and pages_per_block must be >= 1, got {block_q} and {pages_per_block}")
  block_kv = pages_per_block * page_size
  n_items = s + -(-t // block_q)  # sum over seqs of cdiv(q_len, block_q) never exceeds this
  rows = -(-block_q * g // 16) * 16  # (token, head) rows per kv head, padded to a bf16 tile
  kv_lens = kv_lens.astype(jnp.int32)
  cu_q_lens = cu_q_lens.astype(jnp.int32)
  # A window may be a traced scalar (e.g. per layer under a scan): it reaches the kernel as data.
  window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32).reshape(())
  table, n_live, starts = _item_tables(cu_q_lens, kv_lens, num_seqs, n_items=n_items,
                                       block_q=block_q, block_kv=block_kv, sliding_window=window)
  scalars = jnp.stack([n_live[0], jnp.int32(0) if window is None else window])  # [2]
  seq = table[_SEQ * n_items:(_SEQ + 1) * n_items]
  first_q = cu_q_lens[seq] + (jnp.arange(n_items) - starts[seq]) * block_q  # [N] token index
  tok = jnp.minimum(first_q[:, None] + jnp.arange(block_q)[None, :], t - 1)  # [N, bq]
  q_items = q[tok].reshape(n_items, block_q, kh, g, d).transpose(0, 2, 1, 3, 4)  # [N,K,bq,G,D]
  q_items = q_items.reshape(n_items, kh, block_q * g, d)
  q_items = jnp.pad(q_items, ((0, 0), (0, 0), (0, rows - block_q * g), (0, 0)))  # [N, K, R, D]

  def item_block(i, table_ref, pages_ref, scalars_ref):
    del table_ref, pages_ref
    return jnp.minimum(i, jnp.maximum(scalars_ref[0] - 1, 0)), 0, 0, 0  # dead items: no copies

  spec = pl.BlockSpec((None, kh, rows, d), item_block)
  itemsize = jnp.dtype(q.dtype).itemsize

  def call(table, pages, scalars, q_items, k_pages, v_pages, *, interpret):
    kernel = functools.partial(
        _kernel, scale=float(scale), windowed=window is not None, groups=g,
        page_size=page_size, pages_per_block=pages_per_block, pages_per_seq=pages_per_seq,
        n_items=n_items)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(n_items,),
            in_specs=[spec, pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=spec,
            scratch_shapes=[pltpu.VMEM((2, pages_per_block, kh, page_size, d), k_pages.dtype),
                            pltpu.VMEM((2, pages_per_block, kh, page_size, d), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((kh, rows, 1), jnp.float32),
                            pltpu.VMEM((kh, rows, 1), jnp.float32),
                            pltpu.VMEM((kh, rows, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        # Sequential: each item prefetches the next one's first kv block.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",),
            vmem_limit_bytes=_vmem_limit(rows, block_kv, kh, d, itemsize)),
        interpret=interpret, name="ragged_paged_attention",
    )(table, pages, scalars, q_items, k_pages, v_pages)

  out = on_platform(call, table, page_indices.astype(jnp.int32).reshape(-1), scalars, q_items,
                    k_pages, v_pages, interpret=interpret)  # [N, K, R, D]
  out = out[:, :, :block_q * g].reshape(n_items, kh, block_q, g, d).transpose(0, 2, 1, 3, 4)
  out = out.reshape(n_items * block_q, h, d)  # row item * block_q + i: i-th query of the item
  tok_seq, idx, valid = _token_seq_map(cu_q_lens, num_seqs, t)
  row = (starts[tok_seq] + idx // block_q) * block_q + idx % block_q
  return jnp.where(valid[:, None, None], out[jnp.where(valid, row, 0)], 0).astype(q.dtype)


# ------------------------------------------------------------------------------- shard_map

def head_axes(mesh, rules, num_kv_heads: int) -> tuple[str, ...]:
  """Mesh axes that split the kv heads (and with them the query heads) under `rules`: those of
  the logical axis "activation_kv_heads" that divide `num_kv_heads` and are also what
  "activation_heads" maps to; () when the heads stay whole on every device."""
  from qwen2_jax import sharding  # pylint: disable=import-outside-toplevel
  rules = sharding.get_rules(rules)
  kv = sharding.logical_to_spec(("activation_kv_heads",), rules, mesh, (num_kv_heads,))
  heads = sharding.logical_to_spec(("activation_heads",), rules, mesh, (None,))
  as_tuple = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  kv_axes = as_tuple(kv[0] if len(kv) else None)
  return kv_axes if kv_axes == as_tuple(heads[0] if len(heads) else None) else ()


def sharded_ragged_paged_attention(q: Array, k_pages: Array, v_pages: Array, kv_lens: Array,
                                   page_indices: Array, cu_q_lens: Array, num_seqs: Array, *,
                                   mesh, rules="fsdp_tp", **kwargs) -> Array:
  """`ragged_paged_attention` under `jax.shard_map` with heads split over the mesh.

  The kv heads of the page pools and the query heads of q are split over the axes the sharding
  rules give "activation_kv_heads" (see `head_axes`); each device attends with its own heads, no
  communication. Token and sequence arrays are replicated. When the kv heads do not divide over
  those axes (e.g. 2 kv heads, tensor=4) the heads stay whole and every device computes all of
  them, as the cache is then replicated too.

  Args:
    q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs: as `ragged_paged_attention`.
    mesh: a `Mesh` or `AbstractMesh`.
    rules: sharding rules (`qwen2_jax.sharding.get_rules` spec); default "fsdp_tp".
    **kwargs: `ragged_paged_attention` keywords (scale, sliding_window, interpret, block sizes).

  Returns:
    [T, H, D] sharded on heads like q.
  """
  axes = head_axes(mesh, rules, k_pages.shape[1])
  if not axes:
    return ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                                  num_seqs, **kwargs)
  heads = axes[0] if len(axes) == 1 else axes
  num_seqs = jnp.asarray(num_seqs, jnp.int32)
  q_spec, kv_spec = P(None, heads, None), P(None, heads, None, None)
  body = functools.partial(ragged_paged_attention, **kwargs)
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, P(), P(), P(), P()),
                       out_specs=q_spec, check_vma=False)(
                           q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
