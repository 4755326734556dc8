"""Pretraining: the run configuration and the training loop (`qwen2-jax pretrain --config ...`).

The loop is short on purpose: build mesh, data, optimizer and state (fresh, from a checkpoint
to resume, or from weights to continue from), then step; log; evaluate; checkpoint; stop on
SIGTERM after committing the current step; export HF safetensors at the end. Everything that
decides the token stream or the update is in `PretrainConfig`, and its fingerprint is stored
in every checkpoint so a resume with different settings is refused instead of silently
diverging.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any

import jax

from qwen2_jax import sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.presets import get_preset
from qwen2_jax.train import checkpointing, data as data_lib, loop, metrics as metrics_lib
from qwen2_jax.train import step as step_lib
from qwen2_jax.train.loop import NONFINITE_MODES, NonFiniteError  # noqa: F401  (re-exported)
from qwen2_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer


class PretrainConfigError(ValueError):
  """A run configuration value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig:
  model: Qwen2Config
  data: data_lib.DataConfig
  optim: OptimConfig
  tokenizer: str                       # tokenizer.json / HF dir / SentencePiece .model
  output_dir: str                      # checkpoints/, metrics.jsonl, tensorboard/, hf/
  steps: int                           # total optimizer steps of the run
  mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
  rules: Any = "fsdp"                  # preset name or a custom table
  seed: int = 0
  accum_steps: int = 1                 # micro-batches per update (batch_size must divide)
  z_loss: float = 0.0                  # coefficient of mean(logsumexp^2)
  nonfinite: str = "skip"              # non-finite loss/grad: "skip" the update or "abort"
  init_from: str | None = None         # HF dir or Orbax params dir: start from these weights
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  eval_every: int = 0                  # 0: no periodic evaluation
  eval_batches: int = 4
  log_every: int = 10
  export_hf: bool = True               # write output_dir/hf at the end
  peak_flops: float | None = None      # per device, for MFU; None: from the device kind, or a
                                       # measured matmul peak on CPU
  progress: bool = True

  def __post_init__(self):
    if self.steps <= 0:
      raise PretrainConfigError(f"PretrainConfig.steps: must be positive, got {self.steps}")
    if self.nonfinite not in NONFINITE_MODES:
      raise PretrainConfigError(f"PretrainConfig.nonfinite: {self.nonfinite!r} is not one of "
                                f"{NONFINITE_MODES}")
    if self.accum_steps <= 0 or self.data.batch_size % self.accum_steps:
      raise PretrainConfigError(f"PretrainConfig.accum_steps: {self.accum_steps} must divide "
                                f"data.batch_size={self.data.batch_size}")
    for name in ("checkpoint_every", "log_every", "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise PretrainConfigError(f"PretrainConfig.{name}: must be positive")

  def fingerprint(self) -> dict[str, Any]:
    """What a resuming run must share with the run that wrote the checkpoint."""
    model = {k: v for k, v in self.model.to_dict().items() if k != "remat_policy"}
    data = dataclasses.asdict(self.data)
    data.pop("worker_count", None) if self.data.worker_count == 0 else None
    return checkpointing.fingerprint_of(model=model, data=data,
                                        optim=dataclasses.asdict(self.optim),
                                        accum_steps=self.accum_steps, z_loss=self.z_loss)


def _model_from_dict(d: Any) -> Qwen2Config:
  if isinstance(d, Qwen2Config):
    return d
  d = dict(d)
  if "preset" in d:
    return get_preset(d.pop("preset"), **d)
  return Qwen2Config.from_dict(d)


def config_from_dict(d: dict[str, Any]) -> PretrainConfig:
  """Builds a `PretrainConfig` from a parsed YAML/JSON dict; unknown keys are errors."""
  names = {f.name for f in dataclasses.fields(PretrainConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise PretrainConfigError(f"unknown PretrainConfig field(s) {unknown}; known: {sorted(names)}")
  d = dict(d)
  for key in ("tokenizer", "output_dir", "init_from"):  # `$VARS` and `~` in paths
    if isinstance(d.get(key), str):
      d[key] = os.path.expandvars(os.path.expanduser(d[key]))
  d["model"] = _model_from_dict(d.get("model", {}))
  d["data"] = data_lib.DataConfig.from_dict(d.get("data", {}))
  d["optim"] = OptimConfig.from_dict(d.get("optim", {}))
  if "mesh" in d and not isinstance(d["mesh"], sharding.MeshConfig):
    d["mesh"] = sharding.MeshConfig.from_dict(d["mesh"])
  try:
    return PretrainConfig(**d)
  except TypeError as e:
    raise PretrainConfigError(str(e)) from None


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
  """`a.b.c=value` strings (value parsed as YAML) set nested keys of a config dict."""
  import yaml

  d = json.loads(json.dumps(d))
  for item in overrides:
    if "=" not in item:
      raise PretrainConfigError(f"override {item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(value)
  return d


def read_recipe(path: str, overrides: list[str] = ()) -> dict[str, Any]:
  """A YAML (or JSON) recipe file as a dict, with `a.b.c=value` overrides applied."""
  import yaml

  with open(path) as f:
    d = yaml.safe_load(f) or {}
  return apply_overrides(d, list(overrides))


def load_config(path: str, overrides: list[str] = ()) -> PretrainConfig:
  return config_from_dict(read_recipe(path, overrides))


# ----------------------------------------------------------------------------- the loop

def evaluate(cfg: PretrainConfig, eval_step, state, tokenizer, mesh, rules) -> dict[str, float]:
  """Mean loss and perplexity over up to `eval_batches` batches of the held-out documents."""
  ds = data_lib.build_dataset(cfg.data, tokenizer, process_index=jax.process_index(),
                              process_count=jax.process_count(), eval_split=True)
  # A short final batch would need its own compilation: stop before it.
  full = itertools.takewhile(
      lambda b: b["input_ids"].shape[0] * jax.process_count() == cfg.data.batch_size, ds)
  sums = loop.sum_eval_outputs(
      lambda b: eval_step(state.params, sharding.host_local_batch(b, mesh, rules)), full,
      cfg.eval_batches)
  return loop.lm_eval_result(sums)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
  """Runs (or resumes) the training run; returns a summary dict (also in metrics.jsonl)."""
  from qwen2_jax.tokenizer import load_tokenizer

  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.get_rules(cfg.rules)
  shards = sharding.num_batch_shards(mesh, rules)
  micro = cfg.data.batch_size // cfg.accum_steps
  if micro % shards:
    raise PretrainConfigError(
        f"data.batch_size={cfg.data.batch_size} / accum_steps={cfg.accum_steps} = {micro} rows "
        f"per micro-batch cannot be split over the mesh's {shards} batch shards ({dict(mesh.shape)})")
  tokenizer = load_tokenizer(cfg.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise PretrainConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {tokenizer.vocab_size} ids ({cfg.tokenizer})")
  optimizer = make_optimizer(cfg.optim)
  schedule = learning_rate_schedule(cfg.optim)
  os.makedirs(cfg.output_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                    keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  fingerprint = cfg.fingerprint()
  iterator = iter(data_lib.build_dataset(cfg.data, tokenizer, process_index=jax.process_index(),
                                         process_count=jax.process_count()))
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = step_lib.abstract_train_state(cfg.model, optimizer, mesh, rules)
    state, data_state, rng, _ = ckpt.restore(latest, abstract, fingerprint=fingerprint)
    iterator.set_state(data_lib.iterator_state_from_json(data_state["iterator"]))
    start = latest
  else:
    rng = jax.random.key(cfg.seed)
    rng, init_rng = jax.random.split(rng)
    params = loop.load_initial_params(cfg.model, cfg.init_from, mesh, rules,
                                      progress=cfg.progress)
    state = step_lib.init_train_state_sharded(cfg.model, optimizer, init_rng, mesh, rules,
                                              params=params)
    del params
    start = 0
  train_step = step_lib.make_train_step(cfg.model, optimizer, mesh, rules,
                                        accum_steps=cfg.accum_steps, z_loss=cfg.z_loss)
  evaluate_fn = None
  if cfg.eval_every:
    eval_step = step_lib.make_eval_step(cfg.model, mesh, rules)
    evaluate_fn = lambda s: evaluate(cfg, eval_step, s, tokenizer, mesh, rules)

  run = loop.RunLog(cfg, ckpt, steps=cfg.steps, start=start)
  try:
    result = loop.train_loop(
        cfg, run, state=state, rng=rng, start=start, steps=cfg.steps,
        next_batch=lambda: sharding.host_local_batch(next(iterator), mesh, rules),
        train_step=train_step,
        data_state=lambda: {"iterator": data_lib.iterator_state_to_json(iterator.get_state())},
        schedule=schedule, fingerprint=fingerprint,
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        flops_per_token=metrics_lib.flops_per_token(cfg.model, cfg.data.seq_len),
        evaluate=evaluate_fn)
    state = result.state
    summary = {"final_step": int(state.step),
               "first_logged_loss": result.first["loss"] if result.first else None,
               "last": result.last, "skipped": int(state.skipped), "stopped_by": result.stopped,
               "checkpoints": ckpt.all_steps()}
    return loop.finish(cfg, run, result, cfg.steps, summary, tokenizer=cfg.tokenizer)
  finally:
    run.close()
