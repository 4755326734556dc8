"""Host-side bookkeeping of continuous batching: the page pool, the prefix cache, the scheduler.

Pure Python and NumPy (no JAX): `qwen2_jax.infer.engine.Engine` runs the device step that this
module plans.

Pages. The KV cache is a pool of `num_pages` pages of `page_size` token slots each (per layer,
on the device). A sequence owns a block table: its j-th page holds its tokens
[j * page_size, (j + 1) * page_size). `PagePool` hands out page ids from a free list and counts
references: a page is shared when several sequences start with the same cached prompt blocks.

Prefix cache. A full block of a sequence's tokens is keyed by a hash of the whole prefix up to
and including that block (a chain: the key of block j hashes the key of block j - 1 with the
block's tokens), so equal keys mean equal prefixes, not just equal blocks. When a block's keys
and values have been computed, its page is registered under its key. A new request whose prompt
starts with registered blocks takes their pages (one more reference each) and skips their
computation; the last prompt token is always computed, since its logits give the first output
token. A registered page whose last reference goes stays cached, and is evicted (least recently
released first) only when the free list is empty and a page is needed.

Scheduling (`Scheduler.schedule`, one call per engine step). At most `max_num_seqs` sequences
are admitted at once; a step computes at most `max_num_batched_tokens` tokens. Every admitted
sequence whose next token is its last known one (decoding) gets that token first, oldest
admission first; the rest of the budget goes to prefill chunks of admitted sequences that still
have several tokens to compute, then to waiting requests (first come, first served), which are
admitted while a slot, budget and pages are free. A long prompt is computed in chunks over
several steps (chunked prefill). A sequence samples a token in a step iff its chunk ends at its
last known token.

Preemption. When a running sequence needs a page and none is free (nor evictable), the most
recently admitted running sequence is preempted: its pages are released and it goes back to the
front of the waiting queue, to be recomputed from its prompt and the tokens it generated (the
prefix cache usually still holds most of them). Pages are never overwritten while referenced.

A finished sequence (a stop id, or max_new_tokens reached) releases its slot and pages at once,
so a waiting request can be admitted in the next step.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

from qwen2_jax.infer import validation


class PoolExhaustedError(RuntimeError):
  """No page is free or evictable. The scheduler preempts before this can happen; raised only by
  direct `PagePool.allocate` calls on an exhausted pool."""


class KVCacheTooSmallError(validation.GenerationInputError):
  """A request needs more KV-cache pages than the whole pool (or a block table) holds."""


def pages_for(num_tokens: int, page_size: int) -> int:
  """Pages that hold `num_tokens` tokens."""
  return -(-num_tokens // page_size)


def tokens_to_cache(prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots a request needs at most: the last generated token is never fed back."""
  return prompt_len + max_new_tokens - 1


class PagePool:
  """Page ids 0..num_pages-1: a free list, reference counts, and an LRU set of cached pages
  (prefix-cache pages with no reference, evictable)."""

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    self.num_pages = int(num_pages)
    self.refs = np.zeros(self.num_pages, np.int64)
    self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low ids first
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.on_evict = None  # callback(page) when an evictable page is reused

  @property
  def num_available(self) -> int:
    """Pages an `allocate` can return: free plus evictable."""
    return len(self._free) + len(self._evictable)

  @property
  def num_free(self) -> int:
    return len(self._free)

  def allocate(self) -> int:
    """A page with one reference: a free one, else the least recently released cached page."""
    if self._free:
      page = self._free.pop()
    elif self._evictable:
      page, _ = self._evictable.popitem(last=False)
      if self.on_evict is not None:
        self.on_evict(page)
    else:
      raise PoolExhaustedError(f"all {self.num_pages} KV-cache pages are in use")
    self.refs[page] = 1
    return page

  def acquire(self, page: int) -> None:
    """One more reference to `page` (a shared or cached page)."""
    if self.refs[page] == 0:
      self._evictable.pop(page, None)
    self.refs[page] += 1

  def release(self, page: int, cached: bool) -> None:
    """Drops one reference; at zero the page becomes evictable (`cached`) or free."""
    if self.refs[page] <= 0:
      raise RuntimeError(f"page {page} released more often than acquired")
    self.refs[page] -= 1
    if self.refs[page] == 0:
      if cached:
        self._evictable[page] = None
      else:
        self._free.append(page)

  def forget(self, page: int) -> None:
    """An unreferenced cached page that is no longer cached becomes free."""
    if page in self._evictable:
      del self._evictable[page]
      self._free.append(page)

  def check(self) -> None:
    """Raises AssertionError unless free, evictable and referenced pages partition the pool."""
    free, evict = set(self._free), set(self._evictable)
    assert len(free) == len(self._free), "a page is on the free list twice"
    assert not free & evict, "a page is both free and cached"
    referenced = set(np.flatnonzero(self.refs > 0).tolist())
    assert not referenced & (free | evict), "a referenced page is free or evictable"
    assert len(free) + len(evict) + len(referenced) == self.num_pages, "a page is lost"
    assert (self.refs >= 0).all()


class PrefixCache:
  """Chained-hash keys of full token blocks -> the page holding their keys / values."""

  def __init__(self, pool: PagePool, page_size: int):
    self.pool, self.page_size = pool, page_size
    self._page_of: dict[int, int] = {}
    self._key_of: dict[int, int] = {}
    self._blocks: dict[int, tuple] = {}  # key -> (parent key, tokens): guards against collisions
    self.query_tokens = 0  # prompt tokens looked up
    self.hit_tokens = 0    # of which found cached
    pool.on_evict = self._evict

  @staticmethod
  def key(parent: int | None, block: Sequence[int]) -> int:
    return hash((parent, tuple(block)))

  def is_cached(self, page: int) -> bool:
    return page in self._key_of

  def match(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
    """(pages, keys) of the longest cached run of full blocks at the start of `tokens`, leaving at
    least one token to compute; the pages get one more reference each."""
    ps = self.page_size
    n_blocks = (len(tokens) - 1) // ps
    pages, keys, parent = [], [], None
    for b in range(n_blocks):
      block = tuple(tokens[b * ps:(b + 1) * ps])
      k = self.key(parent, block)
      page = self._page_of.get(k)
      if page is None or self._blocks[k] != (parent, block):
        break
      pages.append(page)
      keys.append(k)
      parent = k
    for page in pages:
      self.pool.acquire(page)
    self.query_tokens += n_blocks * ps
    self.hit_tokens += len(pages) * ps
    return pages, keys

  def register(self, parent: int | None, block: Sequence[int], page: int) -> int:
    """Records that `page` holds the computed block after prefix `parent`; returns its key. A key
    already held by another page stays with that page."""
    block = tuple(block)
    k = self.key(parent, block)
    if k not in self._page_of and page not in self._key_of:
      self._page_of[k], self._key_of[page], self._blocks[k] = page, k, (parent, block)
    return k

  def _evict(self, page: int) -> None:
    k = self._key_of.pop(page)
    del self._page_of[k]
    del self._blocks[k]

  def clear(self) -> None:
    """Forgets every cached block (unreferenced cached pages become free)."""
    for page in list(self._key_of):
      del self._key_of[page]
      self.pool.forget(page)
    self._page_of.clear()
    self._blocks.clear()


@dataclasses.dataclass(eq=False)
class Sequence_:
  """One request inside the scheduler. `tokens` = prompt + generated; the first `num_computed`
  have their keys / values in `pages`."""
  rid: int
  prompt_len: int
  max_new_tokens: int
  stop_ids: frozenset
  tokens: list[int]
  output: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  num_computed: int = 0
  pages: list[int] = dataclasses.field(default_factory=list)
  block_keys: list[int] = dataclasses.field(default_factory=list)  # prefix keys of full blocks
  finish_reason: str | None = None
  admitted_at: int = -1
  num_preemptions: int = 0

  @property
  def num_left(self) -> int:
    """Tokens still to compute before the next sample."""
    return len(self.tokens) - self.num_computed


@dataclasses.dataclass
class StepPlan:
  """One step: `seqs[i]` computes its tokens [starts[i], starts[i] + counts[i]); `samples[i]`
  says whether its chunk ends at its last known token (then its logits are sampled)."""
  seqs: list[Sequence_]
  starts: list[int]
  counts: list[int]

  @property
  def num_tokens(self) -> int:
    return sum(self.counts)

  @property
  def samples(self) -> list[bool]:
    return [s + n == len(q.tokens) for q, s, n in zip(self.seqs, self.starts, self.counts)]


@dataclasses.dataclass
class StepArrays:
  """The device inputs of one step (NumPy, int32), padded to T tokens and S sequences."""
  token_ids: np.ndarray     # [T]
  positions: np.ndarray     # [T] token index in its sequence (the RoPE position)
  slot_mapping: np.ndarray  # [T] page * page_size + offset; padding: num_pages * page_size
  kv_lens: np.ndarray       # [S] cached tokens after this step (0 for unused rows)
  page_indices: np.ndarray  # [S, pages_per_seq]
  cu_q_lens: np.ndarray     # [S + 1]
  num_seqs: np.ndarray      # [1]
  logits_index: np.ndarray  # [S] each sequence's last token in the step
  out_index: np.ndarray     # [S] index of the token sampled (number already generated)
  rids: np.ndarray          # [S] request id per row (-1: unused)


class Scheduler:
  """Continuous batching over a paged KV cache (see the module docstring)."""

  def __init__(self, *, num_pages: int, page_size: int, max_num_seqs: int,
               max_num_batched_tokens: int, pages_per_seq: int,
               enable_prefix_caching: bool = True):
    if max_num_batched_tokens < max_num_seqs:
      raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                       f"max_num_seqs ({max_num_seqs})")
    self.page_size, self.max_num_seqs = page_size, max_num_seqs
    self.max_num_batched_tokens, self.pages_per_seq = max_num_batched_tokens, pages_per_seq
    self.pool = PagePool(num_pages)
    self.prefix = PrefixCache(self.pool, page_size) if enable_prefix_caching else None
    self.waiting: collections.deque[Sequence_] = collections.deque()
    self.running: list[Sequence_] = []  # in admission order
    self._admissions = 0
    self.num_preemptions = 0
    self.num_steps = 0
    # Optional n -> the token count a planned step of n tokens is cut to (the engine's padded
    # step sizes): prefill chunks are shortened from the last one, never below 1 token; decode
    # tokens are never cut. The cut tokens run in a later step.
    self.fit_tokens: Callable[[int], int] | None = None

  # ----- requests -----
  def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
    """Raises KVCacheTooSmallError (param "max_new_tokens") if such a request could never be
    held by the pool or by one block table."""
    need = pages_for(tokens_to_cache(prompt_len, max_new_tokens), self.page_size)
    cap = min(self.pool.num_pages, self.pages_per_seq)
    if need > cap:
      what = (f"the KV-cache pool of {self.pool.num_pages} pages" if cap == self.pool.num_pages
              else f"a block table of {self.pages_per_seq} pages")
      raise KVCacheTooSmallError(
          "max_new_tokens", f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
          f"needs {need} pages of {self.page_size} tokens, more than {what}")

  def add(self, rid: int, prompt: Sequence[int], max_new_tokens: int,
          stop_ids: Iterable[int] = ()) -> Sequence_:
    """Queues a request (checked with `check_fits`)."""
    self.check_fits(len(prompt), max_new_tokens)
    seq = Sequence_(rid, len(prompt), int(max_new_tokens), frozenset(stop_ids), list(prompt))
    self.waiting.append(seq)
    return seq

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  # ----- pages -----
  def _cached(self, page: int) -> bool:
    return self.prefix is not None and self.prefix.is_cached(page)

  def _release(self, seq: Sequence_) -> None:
    for page in seq.pages:
      self.pool.release(page, self._cached(page))
    seq.pages, seq.block_keys = [], []

  def _grow(self, seq: Sequence_, num_tokens: int) -> bool:
    """Gives `seq` the pages for its first `num_tokens` tokens; False if the pool is short."""
    need = pages_for(num_tokens, self.page_size) - len(seq.pages)
    if need > self.pool.num_available:
      return False
    for _ in range(need):
      seq.pages.append(self.pool.allocate())
    return True

  def _preempt(self, seq: Sequence_) -> None:
    self.running.remove(seq)
    self._release(seq)
    seq.num_computed, seq.admitted_at = 0, -1
    seq.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(seq)

  # ----- steps -----
  def schedule(self) -> StepPlan | None:
    """The next step's plan (None when nothing is left to do); pages are allocated here."""
    budget = self.max_num_batched_tokens
    plan: dict[Sequence_, int] = {}  # insertion order = row order
    decoding = [s for s in self.running if s.num_left == 1]
    prefilling = [s for s in self.running if s.num_left > 1]
    for seq in decoding + prefilling:
      if seq not in self.running or budget == 0:
        continue  # preempted earlier in this loop
      n = min(seq.num_left, budget)
      while not self._grow(seq, seq.num_computed + n):
        victim = self.running[-1]
        self._preempt(victim)
        budget += plan.pop(victim, 0)
        if victim is seq:
          break
      if seq in self.running:
        plan[seq] = n
        budget -= n
    while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
      seq = self.waiting[0]
      if self.prefix is not None and seq.num_computed == 0 and not seq.pages:
        seq.pages, seq.block_keys = self.prefix.match(seq.tokens)
        seq.num_computed = len(seq.pages) * self.page_size
      n = min(seq.num_left, budget)
      if not self._grow(seq, seq.num_computed + n):
        self._release(seq)  # prefix pages go back; retry in a later step
        seq.num_computed = 0
        break
      self.waiting.popleft()
      seq.admitted_at = self._admissions
      self._admissions += 1
      self.running.append(seq)
      plan[seq] = n
      budget -= n
    if not plan:
      if self.has_work:
        raise RuntimeError("the scheduler made no progress (a request larger than the pool?)")
      return None
    if self.fit_tokens is not None:
      planned = sum(plan.values())
      excess = planned - self.fit_tokens(planned)
      for seq in reversed(list(plan)):
        cut = max(0, min(excess, plan[seq] - 1))
        plan[seq] -= cut
        excess -= cut
    self.num_steps += 1
    return StepPlan(list(plan), [s.num_computed for s in plan], list(plan.values()))

  def complete(self, plan: StepPlan, tokens: Sequence[int], logprobs: Sequence[float]
               ) -> list[Sequence_]:
    """Records a step's results (row i's sampled token and logprob, used where the plan samples);
    returns the sequences that finished, whose pages are released."""
    finished = []
    ps = self.page_size
    for i, (seq, n, sampled) in enumerate(zip(plan.seqs, plan.counts, plan.samples)):
      seq.num_computed += n
      if self.prefix is not None:
        for b in range(len(seq.block_keys), seq.num_computed // ps):
          parent = seq.block_keys[-1] if seq.block_keys else None
          seq.block_keys.append(self.prefix.register(parent, seq.tokens[b * ps:(b + 1) * ps],
                                                     seq.pages[b]))
      if not sampled:
        continue
      token = int(tokens[i])
      seq.tokens.append(token)
      seq.output.append(token)
      seq.logprobs.append(float(logprobs[i]))
      if token in seq.stop_ids:
        seq.finish_reason = "stop"
      elif len(seq.output) >= seq.max_new_tokens:
        seq.finish_reason = "length"
      if seq.finish_reason is not None:
        self.running.remove(seq)
        self._release(seq)
        finished.append(seq)
    return finished

  def arrays(self, plan: StepPlan, num_tokens: int, num_rows: int,
             pages_per_seq: int | None = None) -> StepArrays:
    """The plan as padded device inputs: T = num_tokens >= plan.num_tokens, S = num_rows; the
    block table is `pages_per_seq` wide (default `self.pages_per_seq`; it must hold every
    planned sequence's pages)."""
    T, S, ps = num_tokens, num_rows, self.page_size
    pps = self.pages_per_seq if pages_per_seq is None else int(pages_per_seq)
    pad_slot = self.pool.num_pages * ps
    ids = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    slots = np.full(T, pad_slot, np.int32)
    kv_lens = np.zeros(S, np.int32)
    table = np.zeros((S, pps), np.int32)
    cu = np.zeros(S + 1, np.int32)
    logits_index = np.zeros(S, np.int32)
    out_index = np.zeros(S, np.int32)
    rids = np.full(S, -1, np.int32)
    t = 0
    for i, (seq, start, n) in enumerate(zip(plan.seqs, plan.starts, plan.counts)):
      stop = start + n
      ids[t:t + n] = seq.tokens[start:stop]
      p = np.arange(start, stop, dtype=np.int32)
      pos[t:t + n] = p
      pages = np.asarray(seq.pages, np.int32)
      slots[t:t + n] = pages[p // ps] * ps + p % ps
      kv_lens[i] = stop
      table[i, :len(pages)] = pages
      t += n
      cu[i + 1] = t
      logits_index[i] = t - 1
      out_index[i] = len(seq.output)
      rids[i] = seq.rid
    cu[len(plan.seqs) + 1:] = t
    return StepArrays(ids, pos, slots, kv_lens, table, cu,
                      np.array([len(plan.seqs)], np.int32), logits_index, out_index, rids)

  def check(self) -> None:
    """Raises AssertionError if page accounting is broken: every page's reference count equals
    the block tables holding it; free / cached / referenced pages partition the pool."""
    self.pool.check()
    counts = collections.Counter(p for s in self.running for p in s.pages)
    for s in self.running:
      assert len(set(s.pages)) == len(s.pages), f"request {s.rid} holds a page twice"
      assert len(s.pages) * self.page_size >= s.num_computed
    for s in self.waiting:
      assert not s.pages, f"waiting request {s.rid} holds pages"
    refs = np.zeros(self.pool.num_pages, np.int64)
    for p, c in counts.items():
      refs[p] = c
    assert (refs == self.pool.refs).all(), "reference counts differ from the block tables"
    assert len(self.running) <= self.max_num_seqs
