"""Reward-model training (Bradley-Terry) on preference pairs: loss, step, sharded jit, the run.

The model is `qwen2_jax.reward_model` (a Qwen2 backbone and a scalar head `score`). Data are
DPO's preference JSONL (`train.chat_data`): a batch of B pairs is 2B rows, chosen of pair i in
row 2i and rejected in row 2i + 1, each row one right-padded sequence: the prompt and the
response through the response's final `<|im_end|>` (the ChatML `\\n` after it is left out), so
the reward is read at that `<|im_end|>`. With r_c, r_r the rewards of a pair:

  loss     = -log sigmoid(r_c - r_r)          (mean over pairs)
  accuracy = mean[r_c > r_r]                  (a tie counts as wrong)
  margin   = mean[r_c - r_r]

Padding pairs (empty rows) are excluded from every mean. For a Qwen2-MoE backbone the objective
adds `router_aux_loss_coef` times the load-balancing loss (as `train.step`).

The run (`qwen2-jax rm --config ...`): `RMConfig`, `RMJob`, `rm`, on `train.runner`
(checkpoints, resume, metrics, held-out evaluation and the HF export, which writes a
`Qwen2ForSequenceClassification`). `init_from` is a reward model (HF, continued as it is) or a
causal LM (HF or Orbax, e.g. an SFT export: its `lm_head` is dropped and `score` starts at
`score_init_std` times a standard normal; 0, the default, starts every reward at 0, so the first
loss is log 2 and the gradient first reaches the backbone through the head).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from qwen2_jax import flops, reward_model, sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.train import chat_data, posttrain, runner
from qwen2_jax.train import step as step_lib
from qwen2_jax.train.dpo import _micro_pairs  # pylint: disable=protected-access
from qwen2_jax.train.step import Batch, TrainState
from qwen2_jax.typed_config import ConfigError, Float, Int

RM_BATCH_KEYS = ("input_ids", "positions", "segment_ids")
RM_METRICS = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")


def bt_sums(rewards: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over the valid pairs of the Bradley-Terry loss and metrics (divide by `pairs`).

  Args:
    rewards: [2P] f32, chosen at even and rejected at odd rows.
    valid: [P] bool, pairs that count.
  """
  rc, rr = rewards[0::2], rewards[1::2]  # [P]
  margin = rc - rr
  values = (-jax.nn.log_sigmoid(margin), (margin > 0).astype(jnp.float32), margin, rc, rr)
  w = valid.astype(jnp.float32)
  return {**{k: (v * w).sum() for k, v in zip(RM_METRICS, values)}, "pairs": w.sum()}


def rm_objective(config: Qwen2Config, params: Any, batch: Batch
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(sum of pair losses (+ the MoE balancing term x pairs), sums) of one (micro-)batch."""
  lengths = (batch["segment_ids"] > 0).sum(axis=-1)  # [2P]
  rewards, aux = reward_model.rewards_with_aux(
      config, params, batch["input_ids"], lengths=lengths, positions=batch["positions"],
      segment_ids=batch["segment_ids"])
  sums = bt_sums(rewards, (lengths[0::2] > 0) & (lengths[1::2] > 0))
  objective = sums["loss"]
  if config.is_moe:
    objective = objective + config.router_aux_loss_coef * aux["aux_loss"] * sums["pairs"]
  return objective, sums


def rm_train_step(config: Qwen2Config, optimizer: optax.GradientTransformation,
                  state: TrainState, batch: Batch, *, accum_steps: int = 1
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the mean loss over all valid pairs of the batch (over `accum_steps`
  micro-batches, each pair whole in one). A non-finite loss or gradient leaves params and
  optimizer state unchanged and counts a skipped step (`step.apply_update_if_finite`)."""
  grad_fn = jax.value_and_grad(rm_objective, argnums=1, has_aux=True)
  if accum_steps == 1:
    (_, sums), grads = grad_fn(config, state.params, batch)
  else:
    def body(carry, micro):
      (_, s), g = grad_fn(config, state.params, micro)
      return jax.tree.map(jnp.add, carry, (g, s)), None
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sum_zeros = {k: jnp.zeros((), jnp.float32) for k in (*RM_METRICS, "pairs")}
    (grads, sums), _ = jax.lax.scan(body, (zeros, sum_zeros), _micro_pairs(batch, accum_steps))
  pairs = jnp.maximum(sums["pairs"], 1.0)
  grads = jax.tree.map(lambda g: g / pairs, grads)
  metrics = {k: sums[k] / pairs for k in RM_METRICS}
  new_state, grad_norm, finite = step_lib.apply_update_if_finite(optimizer, state, grads,
                                                                 metrics["loss"])
  return new_state, {**metrics, "grad_norm": grad_norm, "pairs": sums["pairs"],
                     "finite": finite}


# ----------------------------------------------------------------------------------- sharded jit

def state_shardings(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """Shardings of the reward model's `TrainState`: optimizer moments follow their params."""
  params = reward_model.param_shardings(config, mesh, rules)
  opt_shapes = jax.eval_shape(optimizer.init, reward_model.abstract_params(config))
  return TrainState(sharding.replicated(mesh), params,
                    sharding.tree_shardings_like(opt_shapes, params, mesh),
                    sharding.replicated(mesh))


def abstract_train_state(config: Qwen2Config, optimizer: optax.GradientTransformation,
                         mesh: Mesh, rules: sharding.Rules) -> TrainState:
  """The reward model's `TrainState` as sharded `jax.ShapeDtypeStruct`s."""
  params = reward_model.abstract_params(config)
  counter = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(counter, params, jax.eval_shape(optimizer.init, params), counter)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      state_shardings(config, optimizer, mesh, rules))


def _batch_shardings(mesh: Mesh, rules: sharding.Rules) -> dict[str, Any]:
  return {k: sharding.batch_sharding(mesh, rules) for k in RM_BATCH_KEYS}


def make_rm_step(config: Qwen2Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.Rules, *, accum_steps: int = 1, donate: bool = True
                 ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`rm_train_step` jitted for `mesh`: state in/out with its shardings (donated), batch rows
  over the batch axes, metrics replicated."""
  sharding.check_mesh_uses_rules(mesh, rules)
  state_sh = state_shardings(config, optimizer, mesh, rules)

  def step(state, batch):
    with sharding.activation_rules(rules, mesh, config):
      return rm_train_step(config, optimizer, state, batch, accum_steps=accum_steps)

  return jax.jit(step, in_shardings=(state_sh, _batch_shardings(mesh, rules)),
                 out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def make_rm_eval_step(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules
                      ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Jitted held-out evaluation, no update: (params, batch) -> the batch's `bt_sums`."""
  def sums(params, batch):
    with sharding.activation_rules(rules, mesh, config):
      return rm_objective(config, params, batch)[1]
  return jax.jit(sums, in_shardings=(reward_model.param_shardings(config, mesh, rules),
                                     _batch_shardings(mesh, rules)),
                 out_shardings=sharding.replicated(mesh))


# ----------------------------------------------------------------------------------- the data

class RewardPairs(chat_data.PreferenceDataset):
  """`PreferenceDataset` whose rows are whole sequences for scoring: the ids through the
  response's final `<|im_end|>` (its last weighted target), right-padded; `segment_ids` 1 on
  them. The DPO length check (ids - 1 <= seq_len) guarantees they fit: ChatML puts at least
  the `\\n` token after every `<|im_end|>`."""

  def _fill(self, out, r, members):
    i, side = members
    inputs, targets, weights = self.examples[i][side]
    last = int(np.flatnonzero(weights)[-1])  # targets[last] is the response's <|im_end|>
    ids = np.concatenate([inputs[:last + 1], targets[last:last + 1]])
    n = len(ids)
    out["input_ids"][r, :n] = ids
    out["positions"][r, :n] = np.arange(n)
    out["segment_ids"][r, :n] = 1
    out["example_index"][r, 0] = i


# ----------------------------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig(posttrain.ChatRunSettings):
  job_name: ClassVar[str] = "rm"

  score_init_std: Float = 0.0          # the new score head of a causal-LM init_from: this
                                       # times N(0, 1); 0: zeros (every first reward is 0)
  pad_token_id: Int | None = None      # written to the exported config.json (transformers
                                       # reads each row's reward at its last non-pad token);
                                       # None: the model config's

  def __post_init__(self):
    super().__post_init__()
    if not self.score_init_std >= 0:
      raise ConfigError(f"RMConfig.score_init_std: must be >= 0, got {self.score_init_std}")
    if self.pad_token_id is not None:
      if not 0 <= self.pad_token_id < self.model.vocab_size:
        raise ConfigError(f"RMConfig.pad_token_id: must be in [0, model.vocab_size="
                          f"{self.model.vocab_size}), got {self.pad_token_id}")
      object.__setattr__(self, "model", self.model.replace(pad_token_id=self.pad_token_id))


class RMJob(posttrain.ChatJob):
  config = RMConfig
  name = "rm"
  dataset_class = RewardPairs
  rows_per_example = 2
  metric_names = RM_METRICS[1:] + ("pairs",)

  def _score_rng(self) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.cfg.seed), 1)

  def abstract_state(self, optimizer, mesh, rules):
    return abstract_train_state(self.cfg.model, optimizer, mesh, rules)

  def init_state(self, optimizer, rng, mesh, rules, params=None):
    if params is None:
      params = self.random_params(rng, mesh, rules)
    shardings = state_shardings(self.cfg.model, optimizer, mesh, rules)
    return jax.jit(lambda p: step_lib.init_train_state(p, optimizer), out_shardings=shardings)(
        params)

  def random_params(self, rng, mesh, rules):
    return reward_model.init_params_sharded(self.cfg.model, rng, mesh, rules,
                                            score_std=self.cfg.score_init_std)

  def load_params(self, path, mesh, rules):
    _, params = reward_model.load(path, dtype=self.cfg.model.param_dtype, mesh=mesh, rules=rules,
                                  score_std=self.cfg.score_init_std, rng=self._score_rng(),
                                  progress=self.cfg.progress)
    return params

  def flops_per_token(self) -> float:
    # No LM head: 6 V H fewer per token than a language-model step (the score's 6 H is noise).
    model = self.cfg.model
    return (flops.train_flops_per_token(model, self.cfg.data.seq_len)
            - 6.0 * model.vocab_size * model.hidden_size)

  def host_batch(self, batch, held_out=False):
    return {k: batch[k] for k in RM_BATCH_KEYS}

  def make_step(self, optimizer, mesh, rules):
    return make_rm_step(self.cfg.model, optimizer, mesh, rules, accum_steps=self.cfg.accum_steps)

  def make_eval_step(self, mesh, rules):
    return make_rm_eval_step(self.cfg.model, mesh, rules)

  def eval_result(self, sums):
    pairs = sums.get("pairs", 0.0)
    return {**{f"eval/{k}": sums.get(k, 0.0) / max(pairs, 1.0) for k in RM_METRICS},
            "eval/pairs": pairs}


def rm(cfg: RMConfig) -> dict[str, Any]:
  """Runs (or resumes) reward-model training; returns the run summary."""
  return runner.run(RMJob(cfg))
