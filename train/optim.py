"""Optimizer for pretraining and post-training: AdamW, warmup + cosine decay to a floor, clipping.

`OptimConfig` is the recipe; `make_optimizer` turns it into one `optax.GradientTransformation`:
global-norm clipping -> Adam moments -> decoupled weight decay (on a mask) -> the learning rate.
`mu_dtype: bfloat16` keeps the first moment in bf16 (a quarter less optimizer-state memory with
f32 params; the update is computed in f32).
Gradient accumulation is done by the training step (a scan over micro-batches), not by the
optimizer, so the step count of the schedule is the number of updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from qwen2_jax import model
from qwen2_jax.typed_config import ConfigError, Float, Int

MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  learning_rate: Float = 3e-4       # peak learning rate, reached at the end of warmup
  min_learning_rate: Float = 3e-5   # floor of the cosine decay (Qwen2 SFT: 7e-6 -> 7e-7)
  warmup_steps: Int = 100           # linear warmup from 0
  decay_steps: Int = 10_000         # cosine decay length after warmup; then constant at the floor
  b1: Float = 0.9
  b2: Float = 0.95
  eps: Float = 1e-8
  weight_decay: Float = 0.1
  # Params excluded from weight decay, by path component: norms, biases, embeddings.
  no_decay: tuple[str, ...] = ("norm", "bias", "embed_tokens")
  clip_norm: Float | None = 1.0     # global L2 gradient clipping; None disables
  # Dtype of Adam's first moment (e.g. "bfloat16": half its memory); None: the params' dtype.
  # The second moment stays at the params' dtype: its (1 - b2) g^2 increments are below bf16's
  # resolution for b2 near 1.
  mu_dtype: str | None = None

  def __post_init__(self):
    def bad(name: str, rule: str):
      raise ConfigError(f"OptimConfig.{name}: must be {rule}, got {getattr(self, name)!r}")
    for name in ("learning_rate", "eps"):
      if not getattr(self, name) > 0:
        bad(name, "> 0")
    if not 0 <= self.min_learning_rate <= self.learning_rate:
      bad("min_learning_rate", f"in [0, learning_rate={self.learning_rate}]")
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) < 0:
        bad(name, ">= 0")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        bad(name, "in [0, 1)")
    if self.weight_decay < 0:
      bad("weight_decay", ">= 0")
    if self.clip_norm is not None and not self.clip_norm > 0:
      bad("clip_norm", "> 0 or null")
    if self.mu_dtype not in (None, *MOMENT_DTYPES):
      bad("mu_dtype", f"null or one of {MOMENT_DTYPES}")
    object.__setattr__(self, "no_decay", tuple(self.no_decay))


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  """0 -> peak linearly over warmup, cosine from peak to the floor over decay_steps, then flat."""
  floor_ratio = config.min_learning_rate / config.learning_rate
  cosine = optax.cosine_decay_schedule(config.learning_rate, max(config.decay_steps, 1),
                                       alpha=floor_ratio)
  if config.warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.join_schedules([warmup, cosine], [config.warmup_steps])


def decay_mask(params: Any, no_decay: tuple[str, ...] = ()) -> Any:
  """True for params that get weight decay: the model's rule (`model.weight_decay_mask`: the
  weight matrices; never norm scales, biases or the token embedding), less any param with a path
  component containing a `no_decay` substring (extra exclusions; the default `no_decay` names
  only what the model's rule already excludes)."""
  def named(path, decays):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return decays and not any(pattern in name for name in names for pattern in no_decay)
  return jax.tree_util.tree_map_with_path(named, model.weight_decay_mask(params))


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if config.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps,
                                   mu_dtype=config.mu_dtype))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(
        config.weight_decay, mask=lambda params: decay_mask(params, config.no_decay)))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
  return optax.chain(*parts)
