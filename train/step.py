"""The training step: next-token loss, gradient, optimizer update; and its sharded jit.

Pure functions over a `TrainState` pytree. `train_step` is the whole step (no jit, no
sharding); `make_train_step` jits it for a mesh and rules with donated state, which is also what
`qwen2-jax compile` lowers ahead of time. The optimizer is any `optax.GradientTransformation`;
building one (schedules, weight decay masks) belongs to the training loop.

Batch (all [B, T]): `input_ids` int, `targets` int (the next token of each position),
`loss_mask` (1 where the target counts), `positions` (RoPE positions, restarting per packed
document) and `segment_ids` (document ids; None for one document per row).

Memory: `config.loss_chunk_size` computes the LM head and cross entropy a chunk of positions at a
time (`chunked_token_losses`), never the whole [B, T, V] logits; `config.remat_policy` (see
`qwen2_jax.remat`) picks what the backward recomputes; `accum_steps` splits the batch into
micro-batches whose activations live one at a time.

Qwen2-MoE: the objective adds `config.router_aux_loss_coef` times the load-balancing loss and
`router_z_loss` (the recipe setting of that name; ST-MoE, Zoph et al. 2022) times the router
z-loss (`qwen2_jax.api.forward_with_aux`; padding, segment id 0, excluded). With
micro-batches each micro-batch's MoE terms are weighted by its tokens, like its cross entropy.
Extra metrics for MoE models: moe_aux_loss, moe_router_z_loss, moe_drop_rate
and moe_load_max / moe_load_min (the most / least loaded expert over all sparse layers, as a
multiple of the balanced load 1/E).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from qwen2_jax import api, model, sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import dtype_of

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
MOE_METRICS = ("moe_aux_loss", "moe_router_z_loss", "moe_drop_rate", "moe_load_max",
               "moe_load_min")


class TrainState(NamedTuple):
  step: jax.Array          # [] int32, train steps taken (batches consumed), applied or skipped
  params: Any              # the model params (f32 master weights)
  opt_state: Any           # the optimizer's state (e.g. Adam mu/nu, same sharding as params)
  skipped: jax.Array       # [] int32, steps whose update was skipped (non-finite loss/grad)


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  # Two distinct buffers: a donated state may not hold the same buffer twice.
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    jnp.zeros((), jnp.int32))


@jax.custom_vjp
def _nll_lse(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(lse - logits[target], lse), f32, of logits [..., V] and int targets [...] in [-V, V)
  (negative ones count from the end, as `jnp.take_along_axis` reads them).

  Log-softmax in f32 whatever the logits' dtype, without ever storing an f32 copy of the logits:
  the target logit is a compare-and-select fused into a reduction (not a gather, which the TPU
  compiler feeds from a materialised f32 array), and the backward (a `custom_vjp`) keeps only the
  logits as they came, the targets and lse, and rebuilds dz = (g_nll + g_lse) softmax(z)
  - g_nll onehot(target) in one elementwise pass, cast to the logits' dtype as autodiff's would
  be. Equal to `log_softmax` and indexing up to f32 rounding (tests/test_memory_levers.py).
  """
  return _nll_lse_fwd(logits, targets)[0]


def _onehot_mask(targets: jax.Array, vocab: int) -> jax.Array:
  """[..., V] bool, True at each target (iota compare: fuses into its consumer)."""
  t = jnp.where(targets < 0, targets + vocab, targets)
  return jax.lax.broadcasted_iota(t.dtype, (*t.shape, vocab), t.ndim) == t[..., None]


def _nll_lse_fwd(logits, targets):
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)  # [...]
  target = jnp.sum(jnp.where(_onehot_mask(targets, z.shape[-1]), z, 0.0), axis=-1)  # [...]
  return (lse - target, lse), (logits, targets, lse)


def _nll_lse_bwd(res, cotangents):
  logits, targets, lse = res
  g_nll, g_lse = cotangents  # [...] f32 each
  probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])  # [..., V]
  onehot = _onehot_mask(targets, logits.shape[-1])
  dz = (g_nll + g_lse)[..., None] * probs - jnp.where(onehot, g_nll[..., None], 0.0)
  return dz.astype(logits.dtype), None


_nll_lse.defvjp(_nll_lse_fwd, _nll_lse_bwd)


def _chunk_logits(config: Qwen2Config, head: Any, h: jax.Array) -> jax.Array:
  """Logits [B, c, V] of one chunk h [B, c, H] (`model.head_logits`, batch-sharded)."""
  logits = model.head_logits(head, config, h)
  return nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                             "activation_vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_nll_lse(config: Qwen2Config, head: Any, h: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """(nll, lse) [n, B, c] of chunks h [n, B, c, H], targets t [n, B, c]; `head` in the compute
  dtype. Forward and backward are each one `lax.scan` over the n chunks."""
  def body(carry, x):
    return carry, _nll_lse(_chunk_logits(config, head, x[0]), x[1])
  return jax.lax.scan(body, None, (h, t))[1]


def _chunked_fwd(config, head, h, t):
  nll, lse = _chunked_nll_lse(config, head, h, t)
  return (nll, lse), (head, h, t, lse)


def _chunked_bwd(config, res, cotangents):
  """Recomputes each chunk's logits: dz = (g_nll + g_lse) softmax(z) - g_nll onehot(target),
  then the head's VJP; the head's gradient sums over chunks in f32."""
  head, h, t, lse = res
  g_nll, g_lse = cotangents  # [n, B, c] each

  def body(acc, x):
    h_i, t_i, lse_i, gn_i, gl_i = x
    logits, vjp = jax.vjp(lambda hp, hi: _chunk_logits(config, hp, hi), head, h_i)
    probs = jnp.exp(logits.astype(jnp.float32) - lse_i[..., None])  # [B, c, V]
    onehot = jax.nn.one_hot(t_i, logits.shape[-1], dtype=jnp.float32)
    dz = (gn_i + gl_i)[..., None] * probs - gn_i[..., None] * onehot
    d_head, dh_i = vjp(dz.astype(logits.dtype))
    return jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, d_head), dh_i

  zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), head)
  d_head, dh = jax.lax.scan(body, zeros, (h, t, lse, g_nll, g_lse))
  return jax.tree.map(lambda d, w: d.astype(w.dtype), d_head, head), dh, None


_chunked_nll_lse.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_losses(config: Qwen2Config, params: Any, hidden: jax.Array,
                         targets: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-token (nll, logsumexp), both [B, T] f32, of final-norm hidden states [B, T, H]
  (`api.forward_hidden`) and targets [B, T], `chunk_size` sequence positions at a time.

  Equal to the plain path's (`token_losses` with `loss_chunk_size` None) up to rounding: n =
  ceil(T / chunk_size) chunks of c = ceil(T / n) positions (T padded to n * c), one
  `lax.scan` over them forward and one backward (a `custom_vjp` that recomputes each chunk's
  logits), so one chunk's [B, c, V] logits exist at a time instead of the whole [B, T, V]
  logits and the f32 copy the plain backward keeps. The head's weight is cast to the compute
  dtype once (as the plain path does) and its gradient sums over chunks in f32. Chunk i holds
  the positions i, n + i, 2n + i, ...: every chunk spans the sequence, so a sequence-sharded T
  stays in place.
  """
  B, T, H = hidden.shape
  n = -(-T // min(chunk_size, T))
  c = -(-T // n)
  pad = n * c - T
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, c, n, H)  # [B, c, n, H]
  h = jnp.moveaxis(h, 2, 0)                                              # [n, B, c, H]
  t = jnp.moveaxis(jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, c, n), 2, 0)  # [n, B, c]
  dt = dtype_of(config.dtype)
  head = jax.tree.map(lambda w: w.astype(dt), model.head_params(params, config))
  nll, lse = _chunked_nll_lse(config, head, h, t)  # [n, B, c] each
  unchunk = lambda x: jnp.moveaxis(x, 0, 2).reshape(B, c * n)[:, :T]  # [B, T]
  return unchunk(nll), unchunk(lse)


def _forward_losses(config: Qwen2Config, params: Any, batch: Batch
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array] | None]:
  """(nll, lse) as `token_losses`, plus the MoE aux dict (None for a dense model)."""
  kwargs = dict(positions=batch["positions"], segment_ids=batch.get("segment_ids"))
  if config.loss_chunk_size is not None:
    hidden, aux = api.forward_hidden(config, params, batch["input_ids"], **kwargs)  # [B, T, H]
    nll, lse = chunked_token_losses(config, params, hidden, batch["targets"],
                                    config.loss_chunk_size)
    return nll, lse, aux if config.is_moe else None
  if config.is_moe:
    logits, aux = api.forward_with_aux(config, params, batch["input_ids"], **kwargs)
  else:
    logits, aux = api.forward(config, params, batch["input_ids"], **kwargs), None  # [B, T, V]
  nll, lse = _nll_lse(logits, batch["targets"])  # [B, T]
  return nll, lse, aux


def token_losses(config: Qwen2Config, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Per-token (nll, logsumexp), both [B, T] f32: nll = logsumexp(z) - z[target].

  Log-softmax in f32 whatever the compute dtype; over chunks of `config.loss_chunk_size`
  positions (`chunked_token_losses`) when that is set.
  """
  nll, lse, _ = _forward_losses(config, params, batch)
  return nll, lse


def _moe_terms(config: Qwen2Config, aux: dict[str, jax.Array] | None, router_z_loss: float
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(MoE part of the objective, MoE metrics) of one forward; (0, {}) for a dense model."""
  if aux is None:
    return jnp.zeros((), jnp.float32), {}
  objective = config.router_aux_loss_coef * aux["aux_loss"] + router_z_loss * aux["router_z_loss"]
  load = aux["expert_load"] * config.num_experts  # [S, E], 1 = balanced
  values = (aux["aux_loss"], aux["router_z_loss"], aux["drop_rate"], jnp.max(load),
            jnp.min(load))
  return objective, dict(zip(MOE_METRICS, values))


def objective_sums(config: Qwen2Config, params: Any, batch: Batch, *, z_loss: float = 0.0,
                   router_z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective of one (micro-)batch as sums over its `loss_mask` tokens, so micro-batches
  add up exactly: nll + z_loss * logsumexp^2 (+ for MoE, router_aux_loss_coef * load-balancing
  loss + router_z_loss * router z-loss, per-batch means weighted by the batch's tokens).

  Returns (objective sum, {"loss": nll sum, "z_loss": lse^2 sum, "tokens"} + MoE metrics x tokens).
  """
  nll, lse, aux = _forward_losses(config, params, batch)
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = mask.sum()
  nll_sum = (nll * mask).sum()
  z_sum = (lse * lse * mask).sum()
  moe_objective, moe_metrics = _moe_terms(config, aux, router_z_loss)
  sums = {"loss": nll_sum, "z_loss": z_sum, "tokens": tokens,
          **{k: v * tokens for k, v in moe_metrics.items()}}
  return nll_sum + z_loss * z_sum + moe_objective * tokens, sums


def _means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of `objective_sums` -> per-token means (tokens stays a count)."""
  denom = jnp.maximum(sums["tokens"], 1.0)
  return {k: (v if k == "tokens" else v / denom) for k, v in sums.items()}


def loss_fn(config: Qwen2Config, params: Any, batch: Batch, *, z_loss: float = 0.0,
            router_z_loss: float = 0.0) -> tuple[jax.Array, dict[str, Any]]:
  """`objective_sums` as means over the batch's `loss_mask` tokens: (objective, {"loss": mean
  nll, "z_loss": mean lse^2, "tokens"} + MoE metrics)."""
  objective, sums = objective_sums(config, params, batch, z_loss=z_loss,
                                   router_z_loss=router_z_loss)
  return objective / jnp.maximum(sums["tokens"], 1.0), _means(sums)


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """[B, T] -> [A, B/A, T], micro-batch a = rows a, A + a, 2A + a, ... (so each micro-batch
  stays spread over every device of a batch-sharded mesh)."""
  def split(x):
    if x is None:
      return None
    B = x.shape[0]
    return x.reshape(B // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return {k: split(v) for k, v in batch.items()}


def apply_update_if_finite(optimizer: optax.GradientTransformation, state: TrainState,
                           grads: Any, loss: jax.Array
                           ) -> tuple[TrainState, jax.Array, jax.Array]:
  """(next state, grad_norm, finite): the optimizer update of `grads` when `loss` and the
  global gradient norm are finite; otherwise params and optimizer state stay bit-for-bit
  unchanged and `skipped` counts the step. `step` always advances."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(state.step + 1, keep(params, state.params),
                         keep(opt_state, state.opt_state),
                         state.skipped + (1 - finite.astype(jnp.int32)))
  return new_state, grad_norm, finite


def train_step(config: Qwen2Config, optimizer: optax.GradientTransformation, state: TrainState,
               batch: Batch, *, accum_steps: int = 1, z_loss: float = 0.0,
               router_z_loss: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update over `accum_steps` micro-batches (gradient of the mean over ALL their tokens).

  A non-finite loss or gradient norm leaves params and optimizer state bit-for-bit unchanged and
  increments `skipped` (the training loop decides whether to abort). Metrics: loss (mean nll),
  z_loss, grad_norm (global L2, before clipping), tokens, finite (+ the MoE metrics of the
  module docstring for MoE models).
  """
  grad_fn = jax.value_and_grad(objective_sums, argnums=1, has_aux=True)
  kwargs = dict(z_loss=z_loss, router_z_loss=router_z_loss)
  if accum_steps == 1:
    (_, sums), grads = grad_fn(config, state.params, batch, **kwargs)
  else:
    def body(carry, micro):
      (_, s), g = grad_fn(config, state.params, micro, **kwargs)
      return jax.tree.map(jnp.add, carry, (g, s)), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sum_keys = ("loss", "z_loss", "tokens", *(MOE_METRICS if config.is_moe else ()))
    init = (zeros, {k: jnp.zeros((), jnp.float32) for k in sum_keys})
    (grads, sums), _ = jax.lax.scan(body, init, _micro_batches(batch, accum_steps))
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
  metrics = _means(sums)
  new_state, grad_norm, finite = apply_update_if_finite(optimizer, state, grads, metrics["loss"])
  metrics.update(grad_norm=grad_norm, finite=finite)
  return new_state, metrics


# ----------------------------------------------------------------------------------- sharded jit

def state_shardings(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """Shardings of every leaf of the `TrainState`: optimizer moments follow their params."""
  params = sharding.param_shardings(config, mesh, rules)
  opt_shapes = jax.eval_shape(optimizer.init, api.abstract_params(config))
  return TrainState(sharding.replicated(mesh), params,
                    sharding.tree_shardings_like(opt_shapes, params, mesh),
                    sharding.replicated(mesh))


def abstract_train_state(config: Qwen2Config, optimizer: optax.GradientTransformation,
                         mesh: Mesh, rules: sharding.Rules) -> TrainState:
  """The `TrainState` as sharded `jax.ShapeDtypeStruct`s: no memory, for AOT compilation."""
  params = api.abstract_params(config)
  counter = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(counter, params, jax.eval_shape(optimizer.init, params), counter)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(config, optimizer, mesh, rules))


def abstract_batch(batch_size: int, seq_len: int, mesh: Mesh, rules: sharding.Rules,
                   *, packed: bool = True) -> Batch:
  """A sharded `ShapeDtypeStruct` batch of [batch_size, seq_len] (segment_ids when packed)."""
  sh = sharding.batch_sharding(mesh, rules, (batch_size, seq_len))
  spec = lambda dtype: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sh)
  batch = {"input_ids": spec(jnp.int32), "targets": spec(jnp.int32),
           "loss_mask": spec(jnp.float32), "positions": spec(jnp.int32)}
  batch["segment_ids"] = spec(jnp.int32) if packed else None
  return batch


def init_train_state_sharded(config: Qwen2Config, optimizer: optax.GradientTransformation,
                             rng: jax.Array, mesh: Mesh, rules: sharding.Rules, *,
                             params: Any | None = None) -> TrainState:
  """A fresh `TrainState` created directly in its shards (params and optimizer state).

  `params` (already placed, e.g. loaded weights to continue from) replace the random init.
  """
  shardings = state_shardings(config, optimizer, mesh, rules)
  sharding.warn_replicated(api.abstract_params(config), shardings.params)
  if params is not None:
    return jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings)(params)

  def init(key):
    with sharding.activation_rules(rules, mesh, config):
      return init_train_state(api.init_params(config, key), optimizer)

  return jax.jit(init, out_shardings=shardings)(rng)


def make_train_step(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules, *, donate: bool = True, accum_steps: int = 1,
                    z_loss: float = 0.0, router_z_loss: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted for `mesh`: state in/out with its shardings (donated when `donate`),
  batch split by the rules, metrics replicated. `.lower(state, batch)` works on
  `abstract_train_state` / `abstract_batch` for ahead-of-time compilation."""
  sharding.check_mesh_uses_rules(mesh, rules)
  state_sh = state_shardings(config, optimizer, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  metrics_sh = sharding.replicated(mesh)

  def step(state, batch):
    with sharding.activation_rules(rules, mesh, config):
      return train_step(config, optimizer, state, batch, accum_steps=accum_steps, z_loss=z_loss,
                        router_z_loss=router_z_loss)

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Jitted (params, batch) -> {"loss_sum", "tokens"} for held-out evaluation."""
  params_sh = sharding.param_shardings(config, mesh, rules)

  def evaluate(params, batch):
    with sharding.activation_rules(rules, mesh, config):
      nll, _ = token_losses(config, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    return {"loss_sum": (nll * mask).sum(), "tokens": mask.sum()}

  return jax.jit(evaluate, in_shardings=(params_sh, sharding.batch_sharding(mesh, rules)),
                 out_shardings=sharding.replicated(mesh))


def metrics_to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}

