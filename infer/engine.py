"""The generation engine: continuous batching over a paged KV cache.

Cache. Two pools, k and v [L, P, K, page_size, D] in the compute dtype, live on the device for
the engine's lifetime (`model.PagedKVCache`). Sequences own pages through block tables; the host
side (page pool, prefix cache, scheduler) is `qwen2_jax.infer.paged`.

Steps. Each engine step is one call of one jit-compiled program (two on the CPU, see below): a
flat batch of T tokens from up to S = max_num_seqs sequences (decode tokens and prefill chunks
mixed) runs through the model;
every layer writes its new keys / values into the pools and attends over each sequence's pages
(`attention.paged_attention`); logits are computed only at each sequence's last token of the
step, and a token is sampled per sequence. The pools are donated, so they are updated in place.
On the CPU backend without a mesh, the step is two programs, the model and the sampler
(`_SplitStep`; why: `Engine._split_sampler`).
The host reads back the step's sampled tokens (one per row), records them for the sequences
whose chunk ended at their last token, finishes sequences (stop id, EOS, max_new_tokens), and
plans the next step.

Compilations. Off TPU, a step of at most S tokens (decodes only, or a short chunk) is padded to
the power of two covering its tokens, at least 16 and at most S, and has as many sequence rows (a
step with few running sequences computes and samples no more rows than it needs); on TPU to S.
A longer step is padded to the power of two covering its tokens, at most
`max_num_batched_tokens`, with S rows (`Engine.token_buckets`). A planned step filling less than
3/4 of its bucket is cut to the bucket below where its prefill chunks allow
(`Engine.fit_tokens`). The engine's block-table width is the power of two of pages that covers
the longest request seen so far (at least 256 tokens' worth): it only grows, so a call with
shorter requests never recompiles. Off TPU each step's table is narrower where it can be: the
power of two of pages covering the step's longest sequence (at least 256 tokens' worth, at most
the engine's width); so there are at most len(token_buckets) x (1 + log2(width / floor))
programs, each compiled the first time a step needs it. (Since the CPU attention stops after the
last visible key, the width now matters little there: a 16-row Qwen2-0.5B decode step took 250
ms at 16 pages and 255 ms at 32.)
Admitting, finishing, chunking and sampling settings never recompile beyond those.
`Engine.stats` reports compilations (each program's key), steps, preemptions and prefix-cache
hits.

Sampling. Per request: the key of its t-th generated token is fold_in(key(seed), t) (as in the
static engine), so a request's samples depend neither on the other requests nor on when it was
admitted or preempted.

Sharding. With `mesh` and `rules` the params are placed with their logical shardings and the
pools' KV-head axis follows "activation_kv_heads" (tensor parallel); step inputs are replicated.
Where the mesh's "data" axis has size d > 1, the engine keeps d replicas (`_Replica`: weights,
pools, scheduler and programs on the devices of one data index); a batch is split between them
(`split_requests`) and they step concurrently, one host thread each. Across processes, each
process runs the replicas whose devices are its own (`replica_layout`), and one all-gather gives
every process every result (`Engine._exchange`); where a data index spans processes, the whole
mesh is one replica.

CPU. On the CPU backend the engine runs `decode_layout` (unrolled layers, an explicit head), as
the static engine does. Without a mesh, for float32 on an AVX-512 CPU, the kernels of the
attention projections, the MLP and the head are packed once for the prepacked CPU matmul
(`kernels.cpu_matmul`, a C++ XLA FFI call; `static_engine.cpu_packed_width`), and the programs
keep XLA's default (YNNPACK) dots for the rest. Where that extension is missing, an AVX-512 CPU
stores the MLP and head kernels input-minor for XLA's dots instead
(`static_engine.cpu_input_minor`; from max_num_seqs 4: a 1-row step was 5x slower that way).
Off TPU, attention is `kernels.ragged_paged_attention_cpu` (a C++ XLA FFI call: each
query block and kv head walks its keys once from the pool pages; float32 pools, no mesh, the
extension built, attention_impl "auto") or else `ragged_paged_attention_blocked` (a jnp loop
over the (item, page block) pairs the step's queries see); both merge by an online softmax and
read the step's own keys / values from the layer's outputs, so the layers leave the pools
alone: all layers' new keys / values are written in one scatter at the end of the step
(`attention.write_pages_all_layers`), in place. Elsewhere (AVX2
CPUs, a mesh, max_num_seqs < 4 without packing) the programs are compiled without YNNPACK
fusions and decode programs with oneDNN matmuls (`static_engine.compile_lowered`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from qwen2_jax import api, sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.infer import paged
from qwen2_jax.infer import sampling as sampling_lib
from qwen2_jax.infer import validation
from qwen2_jax.infer.paged import KVCacheTooSmallError
from qwen2_jax.infer.sampling import RowParams, SamplingParams
from qwen2_jax.infer.static_engine import (FINISH_REASONS, DecodeState, GenerationResult,
                                           StaticEngine, compile_lowered, cpu_input_minor,
                                           cpu_packed_width, decode_layout, default_dots,
                                           from_input_minor, init_cache, model_layout, write_kv)
from qwen2_jax.kernels import cpu_matmul
from qwen2_jax.layers import dtype_of
from qwen2_jax.model import PagedKVCache, Qwen2ForCausalLM

__all__ = ["Engine", "GenerationResult", "KVCacheTooSmallError", "StaticEngine", "DecodeState",
           "decode_layout", "init_cache", "write_kv", "paged_step", "POOL_AXES"]

Array = jax.Array

# Logical axis names of the pools [L, P, K, page_size, D] (the rules of `qwen2_jax.sharding`).
# A page keeps each kv head's tokens contiguous: on TPU the two minor dims (page_size, D) tile
# without padding whatever K is per device; with K minor (K = 1 per chip under tensor
# parallelism) the compiler copied the pools for the kernel in every layer of every step.
POOL_AXES = ("layers", None, "activation_kv_heads", None, "activation_kv")

# Default share of memory for the pools when neither num_pages nor kv_cache_memory is given.
_CPU_MEMORY_FRACTION = 0.1
_DEVICE_MEMORY_FRACTION = 0.5
# Smallest max_num_seqs with input-minor kernels (`static_engine.cpu_input_minor`): a 1-row step
# with them took 501 ms against 89 ms (XLA copies the kernels back for a 1-row dot), 2 rows 144
# against 132 ms, 8 rows 186 against 211 ms (Qwen2-0.5B fp32, 2-core AVX-512 Xeon, 2026-12-04).
_INPUT_MINOR_MIN_SEQS = 4
# Smallest token bucket (and row count) of a step below max_num_seqs: on the 2-core AVX-512
# Xeon, a Qwen2-0.5B fp32 decode step of 1 row padded to 16 took 124 ms against 132 ms for 16
# rows, while 48 rows took 270 ms (2026-12-05), so smaller buckets would save little there.
_MIN_ROW_BUCKET = 16
# Smallest block-table width, in tokens.
_MIN_TABLE_TOKENS = 256
# A step whose n tokens fill less than this share of their token bucket is cut to the bucket
# below (`Engine.fit_tokens`).
_FIT_UTIL = 0.75


def paged_logits(config: Qwen2Config, params, k_pool: Array, v_pool: Array, token_ids: Array,
                 positions: Array, slot_mapping: Array, kv_lens: Array, page_indices: Array,
                 cu_q_lens: Array, num_seqs: Array, logits_index: Array
                 ) -> tuple[Array, Array, Array]:
  """The model part of a step: the model over a ragged token batch [T] against the pools.
  Returns (logits [S, V] at each sequence row's `logits_index` token, k_pool, v_pool)."""
  cache = PagedKVCache(k_pool, v_pool, slot_mapping, kv_lens, page_indices, cu_q_lens, num_seqs)
  logits, (k_pool, v_pool) = Qwen2ForCausalLM(config).apply(
      {"params": from_input_minor(params)}, token_ids[None], positions[None], None, cache,
      logits_index[None])
  return logits[0], k_pool, v_pool


def paged_step(config: Qwen2Config, params, k_pool: Array, v_pool: Array, token_ids: Array,
               positions: Array, slot_mapping: Array, kv_lens: Array, page_indices: Array,
               cu_q_lens: Array, num_seqs: Array, logits_index: Array, rp: RowParams,
               out_index: Array) -> tuple[Array, Array, Array, Array]:
  """One continuous-batching step: `paged_logits`, then a sample per sequence row. Returns
  (token [S], logprob [S], k_pool, v_pool)."""
  logits, k_pool, v_pool = paged_logits(config, params, k_pool, v_pool, token_ids, positions,
                                        slot_mapping, kv_lens, page_indices, cu_q_lens,
                                        num_seqs, logits_index)
  token, logprob = sampling_lib.sample(logits, rp, out_index)
  return token, logprob, k_pool, v_pool


def split_logits(config: Qwen2Config, params, k_pool: Array, v_pool: Array, logits_out: Array,
                 *args) -> tuple[Array, Array, Array]:
  """`paged_logits` with the logits as float32 (what the sampler reads them as) in the shape of
  `logits_out`, a donated buffer whose memory they reuse (its values are not read)."""
  del logits_out
  logits, k_pool, v_pool = paged_logits(config, params, k_pool, v_pool, *args)
  return logits.astype(jnp.float32), k_pool, v_pool


class _SplitStep:
  """A step as two programs: the model part (`split_logits`: pools and the replica's logits
  buffer donated, so a call allocates only its small temporaries) and the sampler
  (`sampling.sample`, one program per row count S, shared by the steps of that S). Called as
  the one-program step is."""

  def __init__(self, replica: "_Replica", model, sampler, rows: int, vocab: int):
    self.replica, self.model, self.sampler = replica, model, sampler
    self.rows, self.vocab = rows, vocab

  def __call__(self, params, k, v, *args):
    buffers = self.replica.logits_buffers
    out = buffers.pop(self.rows, None)
    if out is None or out.is_deleted():
      out = jnp.zeros((self.rows, self.vocab), jnp.float32)
    logits, k, v = self.model(params, k, v, out, *args[:_MODEL_ARGS])
    token, logprob = self.sampler(logits, *args[_MODEL_ARGS:])
    buffers[self.rows] = logits  # the next step of S rows writes its logits here
    return token, logprob, k, v


# Step inputs of `paged_logits` (after params and pools); the rest (rp, out_index) are the
# sampler's.
_MODEL_ARGS = 8


ADMISSION_ORDERS = ("longest_first", "fifo")
# `Engine(matmul_precision=...)`: lax.Precision names for the steps' fp32 matmuls.
MATMUL_PRECISIONS = ("highest", "high")


def admission_order(requests: Sequence[tuple[Sequence[int], SamplingParams]],
                    admission: str) -> list[int]:
  """The order in which a batch's requests queue for slots. "fifo": as given. "longest_first":
  most max_new_tokens first (then longest prompt, then as given): a batch whose requests have
  varied output budgets ends when its last long request does, so starting those first shortens
  the tail in which few slots are busy (the longest-processing-time rule). It moves nothing
  when every request has the same max_new_tokens; samples do not depend on the order."""
  index = range(len(requests))
  if admission == "fifo":
    return list(index)
  return sorted(index, key=lambda i: (-requests[i][1].max_new_tokens, -len(requests[i][0]), i))


def table_width(tokens: int, page_size: int, max_context: int) -> int:
  """Block-table width (pages) for requests of up to `tokens` cached tokens: the power of two of
  pages covering them, from a floor of min(_MIN_TABLE_TOKENS, max_context) tokens."""
  return max(paged.pages_for(min(_MIN_TABLE_TOKENS, max_context), page_size),
             _bucket(paged.pages_for(tokens, page_size)))


def pool_shape(config: Qwen2Config, num_pages: int, page_size: int) -> tuple[int, ...]:
  """[L, P, K, page_size, D]: the shape of each of the k and v pools."""
  c = config
  return (c.num_hidden_layers, num_pages, c.num_key_value_heads, page_size, c.head_size)


def pool_sharding(mesh, rules, shape) -> NamedSharding:
  """Sharding of a pool [L, P, K, page_size, D]: KV heads as the rules place
  "activation_kv_heads" (tensor parallel), the rest replicated."""
  return NamedSharding(mesh, sharding.logical_to_spec(POOL_AXES, rules, mesh, shape))


def jit_step(config: Qwen2Config, mesh=None, rules=None, pools: NamedSharding | None = None):
  """The jitted engine step (params, k_pool, v_pool, *step inputs) -> (token, logprob, k_pool,
  v_pool), pools donated. Under `mesh` the activations follow `rules`, the pools keep the
  sharding `pools`, and the sampled tokens come back replicated."""
  fn = lambda params, k, v, *a: paged_step(config, params, k, v, *a)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(1, 2))

  def fn_sharded(*a):
    with sharding.activation_rules(rules, mesh, config):
      return fn(*a)

  rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(fn_sharded, donate_argnums=(1, 2), out_shardings=(rep, rep, pools, pools))


def abstract_step_args(config: Qwen2Config, mesh, rules, *, num_tokens: int, max_num_seqs: int,
                       pages_per_seq: int, num_pages: int, page_size: int) -> tuple:
  """`jax.ShapeDtypeStruct`s of (params, k_pool, v_pool, *step inputs) of a step of T =
  num_tokens tokens and S = max_num_seqs rows, placed on `mesh` as the engine places them
  (params by `rules`, pools by `pool_sharding`, step inputs replicated): for ahead-of-time
  compiles (`qwen2-jax compile --target serve`)."""
  c, T, S = config, num_tokens, max_num_seqs
  params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        api.abstract_params(c), sharding.param_shardings(c, mesh, rules))
  shape = pool_shape(c, num_pages, page_size)
  pool = jax.ShapeDtypeStruct(shape, dtype_of(c.dtype),
                              sharding=pool_sharding(mesh, rules, shape))
  rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
  arr = lambda shp, dt=jnp.int32: jax.ShapeDtypeStruct(shp, dt, sharding=rep)
  rp = RowParams(arr((S,), jnp.float32), arr((S,)), arr((S,), jnp.float32),
                 arr((S,), jnp.uint32), arr((S,)), arr((S, 1)), arr((S,)))
  return (params, pool, pool, arr((T,)), arr((T,)), arr((T,)), arr((S,)),
          arr((S, pages_per_seq)), arr((S + 1,)), arr((1,)), arr((S,)), rp, arr((S,)))


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _memory_bytes() -> int | None:
  """Free memory for the pools on this process's first device: accelerator limit minus use, or
  the host's physical memory on CPU; None if unknown."""
  dev = jax.local_devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0))
                 * _DEVICE_MEMORY_FRACTION)
    return None
  try:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * _CPU_MEMORY_FRACTION)
  except (ValueError, OSError, AttributeError):
    return None


def replica_layout(mesh) -> tuple[list, list[int], list[int]]:
  """(meshes, indices, owners): the engine's data-parallel replicas on `mesh`, one per index of
  its "data" axis, each a mesh of that index's devices (every axis kept, "data" with size 1, so
  the same rules apply). `owners[i]` is the process that runs replica i (all of its devices are
  that process's); `meshes` are the replicas this process runs and `indices` theirs. In one
  process that is all of them. Where the data axis has size 1, or some data index has devices
  of several processes, there is one replica, the whole mesh, which every process runs as one
  program: ([mesh], [0], [-1])."""
  if "data" not in mesh.axis_names or mesh.shape["data"] == 1:
    return [mesh], [0], [-1]
  k = mesh.axis_names.index("data")
  groups = [np.take(mesh.devices, [i], axis=k) for i in range(mesh.shape["data"])]
  processes = [{dev.process_index for dev in g.flat} for g in groups]
  if any(len(p) > 1 for p in processes):
    return [mesh], [0], [-1]
  owners = [p.pop() for p in processes]
  indices = [i for i, o in enumerate(owners) if o == jax.process_index()]
  meshes = [jax.sharding.Mesh(groups[i], mesh.axis_names, axis_types=mesh.axis_types)
            for i in indices]
  return meshes, indices, owners


def split_requests(requests: Sequence[tuple[Sequence[int], SamplingParams]], n: int
                   ) -> list[list[int]]:
  """Request indices for each of n replicas, each list in the given order. Requests with the
  same prompt stay together where they can (they share prefix-cache pages), in pieces of at
  most ceil(len / n); pieces go, largest first, to the replica with the least work so far
  (work: prompt + max_new_tokens tokens), which balances the replicas' finishing times."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, (ids, _) in enumerate(requests):
    groups.setdefault(tuple(ids), []).append(i)
  cap = -(-len(requests) // n)
  pieces = [g[j:j + cap] for g in groups.values() for j in range(0, len(g), cap)]
  work = lambda piece: sum(len(requests[i][0]) + requests[i][1].max_new_tokens for i in piece)
  pieces.sort(key=lambda piece: (-work(piece), piece[0]))
  load, out = [0] * n, [[] for _ in range(n)]
  for piece in pieces:
    j = min(range(n), key=lambda r: (load[r], r))
    out[j] += piece
    load[j] += work(piece)
  return [sorted(o) for o in out]


class _Stopped(Exception):
  """Another replica's run failed; this one stops (internal)."""


def _requests_digest(requests) -> int:
  """A checksum of validated requests (prompts and sampling settings), equal in every process
  that holds the same requests."""
  text = repr([(list(map(int, ids)), repr(sp)) for ids, sp in requests]).encode()
  return zlib.crc32(text) & 0x7FFFFFFF  # an int32


class ReplicaProcessError(RuntimeError):
  """An engine replica in another process failed; the message carries its error."""


# Bytes of a failed process's error message in the results' all-gather.
_ERROR_BYTES = 512


class _Replica:
  """One copy of the weights and the KV cache on a group of devices (the whole mesh or the
  default device, or one index of the mesh's data axis), with its own scheduler, pools and
  compiled step programs."""

  def __init__(self, mesh, params, scheduler: paged.Scheduler):
    self.mesh = mesh
    self.params = params
    self.scheduler = scheduler
    self.pools: tuple[Array, Array] | None = None
    self.compiled: dict[tuple, Any] = {}
    self.compile_seconds: dict[tuple, float] = {}
    # Split steps (`_SplitStep`): row count S -> the sampler program, and -> the float32
    # logits [S, V] of the last such step (donated to the next one).
    self.samplers: dict[int, Any] = {}
    self.logits_buffers: dict[int, Array] = {}
    self.current: list[paged.Sequence_] = []  # the requests of the run in progress
    self.num_steps = 0
    self.num_step_tokens = 0
    # Padded token count T of a step -> [steps, seconds] (wall time of `Engine._run_step`,
    # compilations included).
    self.step_time: dict[int, list] = {}


class Engine:
  """Continuous-batching generation over token ids for one model.

  Args:
    config, params: the model (any param dtype; compute in `config.dtype`).
    max_num_seqs: sequences admitted at once (default `max_batch_size`), per replica.
    max_batch_size: the older name of max_num_seqs (used when max_num_seqs is None).
    max_num_batched_tokens: tokens computed per step at most (decode tokens first, then prefill
      chunks); default max(256, max_num_seqs). Must be >= max_num_seqs.
    page_size: tokens per KV-cache page.
    num_pages: pages in the pool (of each replica). Default: from `kv_cache_memory` bytes if
      given, else enough for max_num_seqs requests of max_context tokens, capped at 10% of the
      host memory on CPU, shared by the replicas (50% of the free device memory on accelerators).
    kv_cache_memory: bytes for the k and v pools together (used when num_pages is None).
    enable_prefix_caching: reuse the pages of full prompt blocks computed before.
    max_context: longest prompt + max_new_tokens accepted (default max_position_embeddings).
    eos_token_ids: ids that end a request unless `SamplingParams.ignore_eos`; default the
      config's `eos_token_id`.
    mesh, rules: optional `jax.sharding.Mesh` and `qwen2_jax.sharding` rules for sharded
      generation. Where the mesh's "data" axis has size d > 1, the engine keeps d replicas, one
      per data index, each with the weights placed by `rules` on its devices and its own pools
      and scheduler; a batch's requests are split between them (`split_requests`) and the
      replicas step concurrently, one host thread each. Across processes each process runs the
      replicas whose devices are its own (`replica_layout`); then every process must build
      the engine and call `run_batch` / `generate` / `update_params` with the same arguments.
    layout: "auto" (`decode_layout` on the CPU backend, the params as given elsewhere),
      "unrolled" (always `decode_layout`) or "as_is". Without a mesh, `decode_layout` packs the
      attention, MLP and head kernels (`cpu_packed_width`), or where it cannot, on an AVX-512
      CPU with max_num_seqs >= 4, stores the MLP and head kernels input-minor
      (`cpu_input_minor`).
    vocab_limit: ids >= this are never generated; None: every id of the model. An attribute;
      changing it never recompiles.
    min_prompt_bucket: accepted for compatibility with the static engine; unused.
    admission: the order in which a batch's requests wait for slots: "longest_first" (default:
      most max_new_tokens first, which shortens a mixed batch's tail) or "fifo" (as given).
      Results are always in the order given, and samples do not depend on it.
    matmul_precision: the steps' fp32 matmuls, as lax.Precision names: None (default: the
      precision in force, i.e. jax's default_matmul_precision, full fp32 on CPU; the packed
      CPU kernels in fp32), "highest" (fp32 everywhere) or "high" (three bf16 passes: bf16x3
      on TPU; with packed kernels on a CPU with AMX-BF16, `cpu_matmul.pack_bf16x3` tiles,
      about 1e-5 relative error per product against fp32's 1e-7, and `params` then gives the
      weights back as hi + lo, within 2^-16 of each; on CPUs without AMX, fp32).
  """

  def __init__(self, config: Qwen2Config, params, *, max_num_seqs: int | None = None,
               max_batch_size: int = 8, max_num_batched_tokens: int | None = None,
               page_size: int = 16, num_pages: int | None = None,
               kv_cache_memory: int | None = None, enable_prefix_caching: bool = True,
               max_context: int | None = None, eos_token_ids: Sequence[int] | None = None,
               mesh=None, rules: Any = "fsdp_tp", layout: str = "auto",
               vocab_limit: int | None = None, min_prompt_bucket: int | None = None,
               admission: str = "longest_first", matmul_precision: str | None = None):
    del min_prompt_bucket
    if layout not in ("auto", "unrolled", "as_is"):
      raise ValueError(f"layout must be 'auto', 'unrolled' or 'as_is', got {layout!r}")
    bad = validation.InvalidParameterError
    if admission not in ADMISSION_ORDERS:
      raise bad("admission", f"must be one of {ADMISSION_ORDERS}, got {admission!r}")
    self.admission = admission
    if matmul_precision not in (None, *MATMUL_PRECISIONS):
      raise bad("matmul_precision",
                f"must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
    self.matmul_precision = matmul_precision
    S = int(max_num_seqs if max_num_seqs is not None else max_batch_size)
    if S < 1:
      raise bad("max_num_seqs", f"must be >= 1, got {S}")
    T = int(max_num_batched_tokens if max_num_batched_tokens is not None else max(256, S))
    if T < S:
      raise bad("max_num_batched_tokens", f"{T} is less than max_num_seqs ({S})")
    if page_size < 1:
      raise bad("page_size", f"must be >= 1, got {page_size}")
    config = config.replace(remat_policy="none")
    if mesh is not None:
      meshes, self._replica_indices, self._replica_owners = replica_layout(mesh)
    else:
      meshes, self._replica_indices, self._replica_owners = [None], [0], [-1]
    self._replica_meshes = meshes
    # Replicas of several processes: the constructor, run_batch and update_params exchange with
    # every other process of the job, which must make the same calls with the same arguments.
    self._across_processes = len(set(self._replica_owners)) > 1
    if not meshes and not self._across_processes:
      raise bad("mesh", f"process {jax.process_index()} has no devices in the mesh")
    params = model_layout(params, config)  # e.g. another engine's params
    self._layout_source = None  # the config before decode_layout, when it was applied
    self._input_minor, self._packed, self._bf16x3 = False, 0, False
    if layout == "unrolled" or (layout == "auto" and jax.default_backend() == "cpu"):
      self._layout_source = config
      # Packed or input-minor kernels only without a mesh: the param shardings follow the
      # model's layout.
      self._packed = cpu_packed_width(config, mesh)
      self._bf16x3 = bool(self._packed) and matmul_precision == "high" and cpu_matmul.amx()
      self._input_minor = (not self._packed and cpu_input_minor() and mesh is None
                           and S >= _INPUT_MINOR_MIN_SEQS)
      config, params = decode_layout(config, params, input_minor=self._input_minor,
                                     packed=self._packed, bf16x3=self._bf16x3)
    self.config = config
    # On the CPU backend a step is two programs (`_SplitStep`), the model and the sampler.
    # XLA:CPU allocates a program's temporaries as one block per call, and glibc maps a block
    # over 32 MiB afresh each time, so every page the step touches faults (about 0.9 us each on
    # a 2-core Xeon VM). The sampler's [S, V] temporaries took a 16-row Qwen2-0.5B step's block
    # to 65 MiB: 3,845 faults per greedy decode step and 85.9 ms, against 3 faults and 82.4 ms
    # with the sampler apart (2026-12-06), whose own block is only touched where rows sample.
    self._split_sampler = jax.default_backend() == "cpu"
    self.max_num_seqs = self.max_batch_size = S
    self.max_num_batched_tokens = T
    self.page_size = int(page_size)
    self.max_context = int(max_context or config.max_position_embeddings)
    if eos_token_ids is None:
      eos = config.eos_token_id
      eos_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
    self.vocab_limit = vocab_limit
    self.mesh = mesh
    self.last_finish_reason: str | None = None
    c = config
    self.bytes_per_page = (2 * c.num_hidden_layers * self.page_size * c.num_key_value_heads
                           * c.head_size * np.dtype(dtype_of(c.dtype)).itemsize)
    if mesh is not None:
      self.rules = sharding.get_rules(rules)
      sharding.check_mesh_uses_rules(mesh, self.rules)
    else:
      self.rules = None
    if num_pages is None:
      if kv_cache_memory is not None:
        num_pages = int(kv_cache_memory) // self.bytes_per_page
      else:
        num_pages = S * paged.pages_for(self.max_context, self.page_size)
        limit = _memory_bytes()
        if limit is not None:
          if jax.default_backend() == "cpu":
            limit //= max(1, len(meshes))  # CPU replicas share the host's memory
          num_pages = min(num_pages, limit // self.bytes_per_page)
    if self._across_processes:
      # Every process has a replica, and all use the same pool (free memory differs by host).
      got = np.asarray(multihost_utils.process_allgather(
          np.array([len(meshes), num_pages], np.int32))).reshape(-1, 2)
      if (got[:, 0] == 0).any():
        raise bad("mesh", f"{int((got[:, 0] == 0).sum())} of {len(got)} processes have no "
                  f"devices in the mesh; each process of a multi-process engine runs at least one "
                  f"of its replicas")
      num_pages = int(got[:, 1].min())
    if num_pages < 1:
      raise bad("num_pages", f"the KV cache needs at least one page of {self.bytes_per_page} "
                "bytes")
    self.num_pages = int(num_pages)
    self._table_width = 0
    self._width_lock = threading.Lock()
    self._table_floor = paged.pages_for(min(_MIN_TABLE_TOKENS, self.max_context), self.page_size)
    self._bucket_tables = jax.default_backend() != "tpu"  # see _step_table_width
    # Steps of fewer tokens than max_num_seqs get fewer rows off TPU (see token_bucket); on TPU
    # a decode step reads the weights whatever its rows, and each bucket is one more compile.
    self._min_row_bucket = _MIN_ROW_BUCKET if self._bucket_tables else S
    self._enable_prefix_caching = enable_prefix_caching
    params = self._local_params(params)
    self._replicas = [_Replica(m, self._place(params, m), self._new_scheduler()) for m in meshes]

  def _new_scheduler(self) -> paged.Scheduler:
    sched = paged.Scheduler(
        num_pages=self.num_pages, page_size=self.page_size, max_num_seqs=self.max_num_seqs,
        max_num_batched_tokens=self.max_num_batched_tokens,
        enable_prefix_caching=self._enable_prefix_caching,
        pages_per_seq=paged.pages_for(self.max_context, self.page_size))
    sched.fit_tokens = self.fit_tokens
    return sched

  def fit_tokens(self, n: int) -> int:
    """Tokens a step planned with n tokens computes: n, or the next smaller token bucket when n
    fills less than _FIT_UTIL of its own bucket (the step's last prefill chunks are shortened
    and the rest runs in a later step; decode tokens are never cut, so a step may still end
    above the smaller bucket). Padding rows cost as much as real ones, so this trades a step
    that is mostly padding for a full smaller one."""
    up = self.token_bucket(n)
    below = [b for b in self.token_buckets if b < up]
    if not below or n >= _FIT_UTIL * up:
      return n
    return max(below)

  def _local_params(self, params):
    """`params` with every leaf this process can place on its own replicas. Where the replicas
    are split between processes, each weight that is not fully addressable is resharded on the
    devices (`jax.device_put`, in every process: the engine is built and updated SPMD) so that
    each data index holds a whole copy, split over its devices as `_place` splits it; `_place`
    then gives each local replica its devices' shards, with no host copy. A weight on another
    set of devices is gathered to every host instead. Other leaves are left as they are."""
    if not self._across_processes:
      return params
    shardings = sharding.param_shardings(self.config, self._replica_meshes[0], self.rules)
    devices = set(self.mesh.devices.flat)

    def spread(a, sh):
      if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return a
      if a.sharding.device_set != devices:
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
      drop = lambda x: (tuple(y for y in x if y != "data") or None) if isinstance(x, tuple) \
          else (None if x == "data" else x)
      spec = jax.sharding.PartitionSpec(*(drop(x) for x in sh.spec))
      return jax.device_put(a, NamedSharding(self.mesh, spec))

    return jax.tree.map(spread, params, shardings)

  def _place(self, params, mesh):
    if mesh is None:
      return params
    shardings = sharding.param_shardings(self.config, mesh, self.rules)
    mine = set(mesh.devices.flat)

    def put(a, sh):
      if self._across_processes and isinstance(a, jax.Array) and not a.is_fully_addressable:
        # From `_local_params`: a whole copy per data index; this replica's devices' shards.
        return jax.make_array_from_single_device_arrays(
            a.shape, sh, [s.data for s in a.addressable_shards if s.device in mine])
      return jax.device_put(a, sh)

    return jax.tree.map(put, params, shardings)

  # ----- public API -----
  @property
  def num_replicas(self) -> int:
    """Data-parallel copies of the engine (the mesh's "data" axis size; else 1), in all
    processes."""
    return len(self._replica_owners)

  @property
  def params(self):
    """The weights (of the first replica) as a params tree of `self.config` (unrolled layers on
    CPU). Where the engine stores kernels packed or input-minor (`decode_layout`), this
    restores them: a copy of those kernels."""
    return model_layout(self._replicas[0].params, self.config)

  @property
  def scheduler(self) -> paged.Scheduler:
    """The host-side scheduler (of the first replica)."""
    return self._replicas[0].scheduler

  @property
  def compile_seconds(self) -> dict[tuple, float]:
    """Compile time per program key (T, rows, pages_per_seq), summed over the replicas."""
    out: dict[tuple, float] = {}
    for r in self._replicas:
      for k, s in r.compile_seconds.items():
        out[k] = out.get(k, 0.0) + s
    return out

  @property
  def num_steps(self) -> int:
    return sum(r.num_steps for r in self._replicas)

  @property
  def num_step_tokens(self) -> int:
    return sum(r.num_step_tokens for r in self._replicas)

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> list[GenerationResult]:
    """Generates for every prompt (token ids) with continuous batching; results in the order of
    `prompts`.

    Raises:
      validation.GenerationInputError (a subclass naming the parameter, `.index` = the request;
        `KVCacheTooSmallError` for a request the pool can never hold) before any computation.
    """
    return self.run_batch(self.validate(prompts, sampling))

  def run_batch(self, requests: list[tuple[list[int], SamplingParams]], *,
                check: Callable[[], None] | None = None, check_interval: int = 16
                ) -> list[GenerationResult]:
    """Runs validated requests (ids, params) through the scheduler; results in their order.

    `check` (optional) is called before the first step and then every `check_interval` steps
    (of each replica, from its thread), when no computation of that replica is in flight; an
    exception it raises ends the run (every page is released, and this process's other replicas
    stop at their next step). With replicas in several processes, every process must call this
    with the same requests; a failure in one process reaches the others once they have run
    their shares (`ReplicaProcessError`)."""
    if not self._across_processes:
      if check is not None:
        check()
      if len(self._replicas) == 1:
        return self._run_on(self._replicas[0], requests, check, check_interval)
      results, errors = self._run_replicas(requests, split_requests(requests, len(self._replicas)),
                                           check, check_interval)
      if errors:
        raise errors[0]
      return results
    self._agree("run_batch", _requests_digest(requests), "the same requests")
    parts = split_requests(requests, len(self._replica_owners))
    results: list[GenerationResult | None] = [None] * len(requests)
    errors: list[BaseException] = []
    try:  # whatever happens here, the other processes wait for this one's part of the exchange
      if check is not None:
        check()
      results, errors = self._run_replicas(requests, parts, check, check_interval)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
    return self._exchange(requests, parts, results, errors[0] if errors else None)

  def _run_replicas(self, requests, parts: list[list[int]], check, check_interval: int
                    ) -> tuple[list[GenerationResult | None], list[BaseException]]:
    """Runs `parts[i]` on data index i's replica for this process's replicas, one host thread
    each; (results, None where another process ran the request, errors)."""
    results: list[GenerationResult | None] = [None] * len(requests)
    jobs = [(r, parts[i]) for r, i in zip(self._replicas, self._replica_indices) if parts[i]]
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(replica: _Replica, idx: list[int]) -> None:
      try:
        out = self._run_on(replica, [requests[i] for i in idx], check, check_interval, stop)
      except _Stopped:
        return
      except BaseException as e:  # pylint: disable=broad-except
        errors.append(e)
        stop.set()
        return
      for i, res in zip(idx, out):
        results[i] = res

    threads = [threading.Thread(target=work, args=job, name=f"qwen2-jax-replica-{n}",
                                daemon=True) for n, job in enumerate(jobs)]
    try:
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    finally:
      stop.set()  # e.g. KeyboardInterrupt in join: the replicas stop at their next step
      for t in threads:
        if t.ident is not None:
          t.join()
    return results, errors

  def _agree(self, what: str, value: int, meaning: str) -> None:
    """Raises the same error in every process unless all of them pass the same `value` (one
    small all-gather; called in every process)."""
    got = np.asarray(multihost_utils.process_allgather(np.array([value], np.int32)))
    if len(set(got.ravel().tolist())) > 1:
      raise ReplicaProcessError(f"{what}: the processes did not pass {meaning} (every process "
                                f"of a multi-process engine calls it with the same arguments)")

  def _exchange(self, requests, parts: list[list[int]], results: list[GenerationResult | None],
                error: BaseException | None) -> list[GenerationResult]:
    """Every process's results to every process: one all-gather of one int32 array per process
    (its index, its error message, and for each request its replicas ran, in the order of
    `parts`, the finish reason, the output length, then tokens and float32 logprob bits, padded
    to the largest max_new_tokens and to the most requests any process ran). Each process calls
    it, also after its own replicas failed, so that none waits for it forever."""
    width = max([sp.max_new_tokens for _, sp in requests] + [1])
    owned = {}  # process -> its requests, in the order it packs them
    for j, idx in enumerate(parts):
      owned.setdefault(self._replica_owners[j], []).extend(idx)
    most = max([len(v) for v in owned.values()] + [1])
    codes = {reason: code for code, reason in FINISH_REASONS.items()}
    head = np.zeros(1 + _ERROR_BYTES, np.int32)
    head[0] = jax.process_index()
    if error is not None:
      try:
        text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")
      except Exception:  # pylint: disable=broad-except  (a __str__ that raises)
        text = type(error).__name__.encode("utf-8", "replace")
      text = text[:_ERROR_BYTES - 1] or b"?"
      head[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    rows = np.zeros((most, 2 + 2 * width), np.int32)  # reason, length, tokens, logprob bits
    for k, i in enumerate(owned.get(jax.process_index(), [])):
      res = results[i]
      if res is not None:
        m = len(res.output_ids)
        rows[k, 0], rows[k, 1] = codes[res.finish_reason], m
        rows[k, 2:2 + m] = res.output_ids
        rows[k, 2 + width:2 + width + m] = np.asarray(res.logprobs, np.float32).view(np.int32)
    g = np.asarray(multihost_utils.process_allgather(np.concatenate([head, rows.ravel()])))
    by_process = {int(row[0]): row for row in g}
    if error is not None:
      raise error
    failed = [p for p in sorted(by_process) if by_process[p][1]]
    if failed:
      p = failed[0]
      text = bytes(by_process[p][1:1 + _ERROR_BYTES].astype(np.uint8)).rstrip(b"\0")
      raise ReplicaProcessError(f"run_batch: process {p}'s replicas failed: "
                                f"{text.decode(errors='replace')}")
    out: list[GenerationResult] = [None] * len(requests)  # type: ignore[list-item]
    for p, idx in owned.items():
      got = by_process[p][1 + _ERROR_BYTES:].reshape(most, 2 + 2 * width)
      for k, i in enumerate(idx):
        m = int(got[k, 1])
        out[i] = GenerationResult(list(requests[i][0]), got[k, 2:2 + m].tolist(),
                                  got[k, 2 + width:2 + width + m].view(np.float32).tolist(),
                                  FINISH_REASONS[int(got[k, 0])])
    return out

  def stream(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
             interval: int = 4) -> Iterator[list[int]]:
    """Yields one request's new token ids as they are generated: the first token as soon as the
    prompt is computed, then chunks of `interval` (the last one may be shorter). Finish reason:
    `self.last_finish_reason` after the iterator ends. Runs on the first replica."""
    requests = self.validate([prompt], sampling)
    self.last_finish_reason = None
    replica = self._replicas[0]
    steps = self._steps(replica, requests)
    emitted = 0
    try:
      for _ in steps:
        seq = replica.current[0]
        n = len(seq.output)
        if n - emitted >= interval or seq.finish_reason is not None or (n and not emitted):
          while emitted < n:
            yield seq.output[emitted:emitted + interval]
            emitted = min(emitted + interval, n)
        if seq.finish_reason is not None:
          self.last_finish_reason = seq.finish_reason
    finally:
      steps.close()

  @property
  def stats(self) -> dict[str, Any]:
    """Compilations (count, seconds, each program's key and time), steps, tokens computed,
    steps and their wall seconds by padded token count ("step_time", keyed "T=16"; a step's
    compilation counts in its time), preemptions and prefix-cache hits, since the engine was
    built (summed over replicas)."""
    reps = self._replicas
    prefixes = [r.scheduler.prefix for r in reps if r.scheduler.prefix is not None]
    out = {"num_compilations": sum(len(r.compiled) for r in reps),
           "num_sampler_compilations": sum(len(r.samplers) for r in reps),
           "compile_seconds": round(sum(sum(r.compile_seconds.values()) for r in reps), 3),
           "programs": {f"step(T={k[0]}, rows={k[1]}, pages_per_seq={k[2]})": round(v, 3)
                        for k, v in self.compile_seconds.items()},
           "steps": self.num_steps, "step_tokens": self.num_step_tokens,
           "step_time": self._step_time(),
           "preemptions": sum(r.scheduler.num_preemptions for r in reps),
           "prefix_cache_query_tokens": sum(p.query_tokens for p in prefixes),
           "prefix_cache_hit_tokens": sum(p.hit_tokens for p in prefixes),
           "num_pages": self.num_pages, "page_size": self.page_size}
    if self.num_replicas > 1:
      out["replicas"] = len(reps)
      out["replica_steps"] = [r.num_steps for r in reps]
    if self._across_processes:
      out["all_replicas"] = self.num_replicas
    return out

  def _step_time(self) -> dict[str, dict[str, float]]:
    total: dict[int, list] = {}
    for r in self._replicas:
      for T, (n, sec) in list(r.step_time.items()):  # a replica's thread may add a key
        total.setdefault(T, [0, 0.0])
        total[T][0] += n
        total[T][1] += sec
    return {f"T={T}": {"steps": n, "seconds": round(sec, 6)}
            for T, (n, sec) in sorted(total.items())}

  def validate(self, prompts, sampling) -> list[tuple[list[int], SamplingParams]]:
    """Checks every request (typed errors carry the request index); returns (ids, params)."""
    return validation.check_requests(prompts, sampling, vocab_size=self.config.vocab_size,
                                     max_context=self.max_context,
                                     check=lambda ids, sp: self._check_fits(len(ids),
                                                                            sp.max_new_tokens))

  def reset_prefix_cache(self) -> None:
    """Forgets every cached prompt block (no request may be running)."""
    for r in self._replicas:
      if r.scheduler.prefix is not None:
        r.scheduler.prefix.clear()

  def update_params(self, params) -> None:
    """Generates with new weights of the same model from now on (an online trainer's policy).

    `params` has the layout the engine was built with (before `decode_layout`) and may be
    sharded any way: on a mesh it is resharded in memory to each replica's shardings, with no
    checkpoint round trip (with replicas in several processes, arrays on another set of devices
    than the mesh's are gathered to every host first). Same shapes and dtypes: nothing
    recompiles. Cached prompt blocks were computed with the old weights, so the prefix cache is
    cleared."""
    busy = any(r.scheduler.has_work for r in self._replicas)
    if self._across_processes:  # every process raises, or none does
      self._agree("update_params", int(busy), "an idle engine (one is running requests)")
    if busy:
      raise RuntimeError("update_params: the engine is running requests")
    params = model_layout(params, self.config)
    if self._layout_source is not None:
      _, params = decode_layout(self._layout_source, params, input_minor=self._input_minor,
                                packed=self._packed, bf16x3=self._bf16x3)
    params = self._local_params(params)
    for r in self._replicas:
      r.params = self._place(params, r.mesh)
    self.reset_prefix_cache()

  # ----- the step loop -----
  def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
    need = paged.pages_for(paged.tokens_to_cache(prompt_len, max_new_tokens), self.page_size)
    if need > self.num_pages:
      raise KVCacheTooSmallError(
          "max_new_tokens", f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
          f"needs {need} KV-cache pages of {self.page_size} tokens; the pool has "
          f"{self.num_pages} (raise num_pages or kv_cache_memory)")

  def _run_on(self, replica: _Replica, requests, check, check_interval: int,
              stop: threading.Event | None = None) -> list[GenerationResult]:
    """Runs requests to completion on one replica; results in their order. Raises _Stopped
    (pages released) when `stop` is set between steps."""
    results: list[GenerationResult | None] = [None] * len(requests)
    steps = self._steps(replica, requests)
    try:
      for step, finished in enumerate(steps, 1):
        for seq in finished:
          results[seq.rid] = self._result(requests[seq.rid][0], seq)
        if stop is not None and stop.is_set():
          raise _Stopped()
        if check is not None and step % check_interval == 0:
          check()
    finally:
      steps.close()  # releases every page at once, also when `check` raised
    return results

  def _steps(self, replica: _Replica, requests) -> Iterator[list[paged.Sequence_]]:
    """Runs the requests to completion on `replica`, one engine step per iteration; yields the
    sequences that finished in each step. The scheduler is emptied however the iteration
    ends."""
    sched = replica.scheduler
    if sched.has_work:
      raise RuntimeError("the engine is already running requests (one run at a time)")
    if not requests:
      return
    longest = max(paged.tokens_to_cache(len(ids), sp.max_new_tokens) for ids, sp in requests)
    # The block table only grows (no recompiles for shorter requests later); replicas' threads
    # update it one at a time.
    with self._width_lock:
      self._table_width = max(self._table_width,
                              table_width(longest, self.page_size, self.max_context))
      sched.pages_per_seq = self._table_width
    table = self._request_table(requests)
    replica.current = []
    try:
      for i in admission_order(requests, self.admission):
        ids, sp = requests[i]
        stops = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else self.eos_token_ids)
        replica.current.append(sched.add(i, ids, sp.max_new_tokens, stops))
      while True:
        plan = sched.schedule()
        if plan is None:
          return
        tokens, logprobs = self._run_step(replica, plan, table)
        yield sched.complete(plan, tokens, logprobs)
    finally:
      self._abort(replica)

  @staticmethod
  def _abort(replica: _Replica) -> None:
    sched = replica.scheduler
    for seq in list(sched.running):
      sched.running.remove(seq)
      sched._release(seq)  # pylint: disable=protected-access
    sched.waiting.clear()

  def _request_table(self, requests) -> dict[str, np.ndarray]:
    sps = [sp for _, sp in requests]
    return {"temperature": np.array([p.temperature for p in sps] + [0.0], np.float32),
            "top_k": np.array([p.top_k for p in sps] + [0], np.int32),
            "top_p": np.array([p.top_p for p in sps] + [1.0], np.float32),
            "seed": np.array([p.seed % 2**32 for p in sps] + [0], np.uint32)}

  def _run_step(self, replica: _Replica, plan: paged.StepPlan, table
                ) -> tuple[np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    T = self.token_bucket(plan.num_tokens)
    S = self.row_bucket(T)
    pps = self._step_table_width(replica, plan)
    a = replica.scheduler.arrays(plan, T, S, pages_per_seq=pps)
    rows = a.rids  # -1 picks the trailing greedy entry of the table
    limit = self.vocab_limit or self.config.vocab_size
    rp = RowParams(table["temperature"][rows], table["top_k"][rows], table["top_p"][rows],
                   table["seed"][rows], np.zeros(S, np.int32), np.full((S, 1), -1, np.int32),
                   np.full(S, limit, np.int32))
    args = (a.token_ids, a.positions, a.slot_mapping, a.kv_lens, a.page_indices, a.cu_q_lens,
            a.num_seqs, a.logits_index, rp, a.out_index)
    if replica.mesh is not None:
      rep = NamedSharding(replica.mesh, jax.sharding.PartitionSpec())
      args = jax.device_put(args, rep)
    k, v = self._get_pools(replica)
    replica.pools = None  # donated below
    fn = self._program(replica, T, S, pps, k, v, args)
    token, logprob, k, v = fn(replica.params, k, v, *args)
    replica.pools = (k, v)
    if not token.is_fully_addressable:  # one program over several processes: replicated
      token, logprob = token.addressable_data(0), logprob.addressable_data(0)
    token, logprob = np.asarray(token), np.asarray(logprob)  # waits for the step
    replica.num_steps += 1
    replica.num_step_tokens += plan.num_tokens
    spent = replica.step_time.setdefault(T, [0, 0.0])
    spent[0] += 1
    spent[1] += time.perf_counter() - t0
    return token, logprob

  def token_bucket(self, n: int) -> int:
    """Padded token count T of a step computing n tokens (one compiled program per bucket and
    table width): up to max_num_seqs, off TPU the powers of two from _MIN_ROW_BUCKET below it,
    then max_num_seqs (on TPU max_num_seqs only); above, the powers of two capped at
    max_num_batched_tokens."""
    S = self.max_num_seqs
    if n <= S:
      return min(S, max(self._min_row_bucket, _bucket(n)))
    return min(self.max_num_batched_tokens, _bucket(n))

  def row_bucket(self, num_tokens: int) -> int:
    """Sequence rows R of a step padded to num_tokens (T): T where T <= max_num_seqs (a step
    of decodes only needs no more rows than tokens), else max_num_seqs."""
    return min(num_tokens, self.max_num_seqs)

  @property
  def token_buckets(self) -> list[int]:
    """Every T a step may be padded to, ascending."""
    S, T = self.max_num_seqs, self.max_num_batched_tokens
    return sorted({S, T} | {1 << i for i in range(T.bit_length())
                            if min(self._min_row_bucket, S) <= 1 << i < T and 1 << i != S})

  def _step_table_width(self, replica: _Replica, plan: paged.StepPlan) -> int:
    """Block-table width of a step. Off TPU: the power of two of pages covering the step's
    longest sequence, at least the floor (_MIN_TABLE_TOKENS) and at most the engine's width
    (see the module docstring); on TPU always the engine's width."""
    width = replica.scheduler.pages_per_seq
    if not self._bucket_tables:
      return width
    need = max(len(seq.pages) for seq in plan.seqs)
    return min(width, max(self._table_floor, _bucket(need)))

  def _get_pools(self, replica: _Replica) -> tuple[Array, Array]:
    if replica.pools is None or any(p.is_deleted() for p in replica.pools):
      c = self.config
      shape = pool_shape(c, self.num_pages, self.page_size)
      dt = dtype_of(c.dtype)
      if replica.mesh is None:
        replica.pools = (jnp.zeros(shape, dt), jnp.zeros(shape, dt))
      else:
        sh = pool_sharding(replica.mesh, self.rules, shape)
        zeros = jax.jit(lambda: jnp.zeros(shape, dt), out_shardings=sh)
        replica.pools = (zeros(), zeros())
      if replica.scheduler.prefix is not None:
        replica.scheduler.prefix.clear()  # fresh pools hold no cached blocks
    return replica.pools

  def _program(self, replica: _Replica, T: int, S: int, pps: int, k, v, args):
    key = (T, S, pps)
    if key not in replica.compiled:
      split = replica.mesh is None and self._split_sampler
      if split:
        # keep_unused: the logits buffer is only there to be donated.
        jitted = jax.jit(functools.partial(split_logits, self.config),
                         donate_argnums=(1, 2, 3), keep_unused=True)
        logits = jax.ShapeDtypeStruct((S, self.config.vocab_size), jnp.float32)
        step_args = (logits, *args[:_MODEL_ARGS])
      else:
        jitted = jit_step(self.config, replica.mesh, self.rules,
                          None if replica.mesh is None else pool_sharding(replica.mesh,
                                                                          self.rules, k.shape))
        step_args = args
      t0 = time.perf_counter()
      # None leaves the precision in force (jax's config, an enclosing context) as it is.
      with (contextlib.nullcontext() if self.matmul_precision is None
            else jax.default_matmul_precision(self.matmul_precision)):
        lowered = jitted.lower(replica.params, k, v, *step_args)
      program = compile_lowered(lowered, decode=T == S,
                                default_dots=default_dots(self._input_minor, self._packed))
      if split:
        if S not in replica.samplers:
          replica.samplers[S] = jax.jit(sampling_lib.sample).lower(
              logits, *args[_MODEL_ARGS:]).compile()
        program = _SplitStep(replica, program, replica.samplers[S], S, self.config.vocab_size)
      replica.compiled[key] = program
      replica.compile_seconds[key] = time.perf_counter() - t0
    return replica.compiled[key]

  @staticmethod
  def _result(prompt: list[int], seq: paged.Sequence_) -> GenerationResult:
    return GenerationResult(list(prompt), list(seq.output), list(seq.logprobs),
                            seq.finish_reason)
