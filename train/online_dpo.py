"""Online DPO (the Qwen2 report's online stage of RLHF): `qwen2-jax dpo` with `online:`.

Each round (`train.online`): the next `data.batch_size` prompts, `online.rollout.num_generations`
responses to each sampled from the current policy, scored by `online.rewards` (the reward
model, a rule, or both). Per prompt, the highest-scoring response becomes the chosen and the
lowest-scoring the rejected response (the first of equal scores); a prompt whose responses all
score the same gives no pair (counted as `no_preference`), and a round without any pair makes
no update. Then `online.num_iterations` DPO updates on those pairs (`train.dpo.dpo_train_step`: same loss, `beta`, `label_smoothing`),
against the frozen reference (`reference_from`, default the initial policy) held on the mesh.
One run step is one round. Logged besides DPO's metrics: the rollout's (reward mean / std,
lengths, tokens/s, generation share) and `score_margin`, the mean reward gap of the pairs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import flops, sharding
from qwen2_jax.train import dpo, online, step as step_lib


def best_and_worst(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
  """(best [P], worst [P], has_preference [P] bool): indices into the P * G rewards."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  offset = np.arange(len(r)) * group_size
  return (offset + r.argmax(axis=1), offset + r.argmin(axis=1),
          r.max(axis=1) > r.min(axis=1))


class OnlineDPOJob(online.OnlineJob):
  config = dpo.DPOConfig
  name = "dpo"
  rows_per_example = 2

  def __init__(self, cfg: dpo.DPOConfig):
    super().__init__(cfg)
    self.updates_per_step = cfg.online.num_iterations
    self.metric_names = (*dpo.DPO_METRICS[1:], "pairs", "no_preference", "score_margin",
                         *self.rollout_metric_names(), "train_tokens_per_s",
                         "generation_share")
    self.ref_params = None

  def online_settings(self):
    return self.cfg.online

  def flops_per_token(self) -> float:
    train = flops.train_flops_per_token(self.cfg.model, self.cfg.data.seq_len)
    return flops.dpo_flops_factor(False) * train * self.cfg.online.num_iterations

  def prepare(self, mesh, rules, initial_params, resumed):
    self.ref_params = self.reference_params(mesh, rules, initial_params, resumed)
    self.start_rollouts(mesh, rules)

  def make_step(self, optimizer, mesh, rules):
    cfg = self.cfg
    update = dpo.make_dpo_step(cfg.model, optimizer, mesh, rules, beta=cfg.beta,
                               label_smoothing=cfg.label_smoothing,
                               accum_steps=cfg.accum_steps, reference="on_the_fly")
    G = cfg.online.rollout.num_generations
    P = cfg.data.batch_size

    def step(state, batch):
      t0 = time.perf_counter()
      round_index = int(state.step)
      ro = self.rollout(state.params, batch["example_index"][:, 0], round_index)
      best, worst, has = best_and_worst(ro.rewards, G)
      outputs, logprobs = [], []
      for b, w, ok in zip(best, worst, has):
        for k in (b, w):  # no preference: empty responses, so the pair has no tokens
          outputs.append(ro.output_ids[k] if ok else [])
          logprobs.append(ro.logprobs[k] if ok else [])
      rows = online.rows_of(ro.prompt_ids, outputs, logprobs, cfg.data.seq_len, 2)
      for k in range(len(outputs)):
        if not outputs[k]:
          rows["loss_mask"][k] = 0.0
      rows = {k: v for k, v in rows.items() if k in dpo.DPO_BATCH_KEYS}
      rows = online.pad_rows(rows, 2 * P)
      placed = sharding.host_local_batch(rows, mesh, rules)
      t1 = time.perf_counter()
      outs = []
      for _ in range(cfg.online.num_iterations if has.any() else 0):  # no pair: no update
        state, out = update(state, self.ref_params, placed)
        outs.append(step_lib.metrics_to_host(out))
      outs = outs or [online.NO_UPDATE]
      state = state._replace(step=jax.device_put(jnp.int32(round_index + 1),
                                                 state.step.sharding))
      t2 = time.perf_counter()
      mean = lambda k: float(np.mean([o[k] for o in outs]))
      metrics = {k: mean(k) for k in (*dpo.DPO_METRICS, "grad_norm", "pairs")}
      metrics["finite"] = float(all(o["finite"] for o in outs))
      metrics["no_preference"] = float((~has).sum())
      metrics["score_margin"] = float(np.mean(ro.rewards[best[has]] - ro.rewards[worst[has]])
                                      if has.any() else 0.0)
      metrics.update(self.rollout_metrics(ro))
      trained = float(rows["loss_mask"].sum()) * cfg.online.num_iterations
      metrics["train_tokens_per_s"] = trained / max(t2 - t1, 1e-9)
      metrics["generation_share"] = ro.seconds / max(t2 - t0, 1e-9)
      return state, metrics

    return step
