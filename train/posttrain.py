"""Post-training runs (SFT, DPO): the shared run configuration and training loop.

The loop is pretraining's (`train.loop`), with the same checkpoints (train state + data
position + RNG + settings fingerprint; resume from the latest committed step; SIGTERM saves and
exits), metrics (progress bar, `metrics.jsonl`, TensorBoard), periodic held-out evaluation,
sharding and HF export; what differs per job sits behind a small `Job` object
(`train.sft.SFTJob`, `train.dpo.DPOJob`): its dataset, its jitted train and eval steps, what it
must fingerprint, and the metrics it logs.

Differences from pretraining: data are JSONL chat files read whole up front
(`train.chat_data`), the run length defaults to `data.num_epochs` passes over them, and with
`auto_decay` (default) the learning rate decays from `optim.learning_rate` to
`optim.min_learning_rate` over exactly the run (decay_steps = steps - warmup_steps). Weights
come from `init_from` (an HF directory or an Orbax params directory, `qwen2-jax convert`); the
model config is then read from there unless `model` names a preset or every field, and the
tokenizer defaults to the one in `init_from`; its files are copied into the HF export.
Evaluation (`eval_every`) reads the examples held out by `data.eval_every_nth_example`, which
are never trained on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from qwen2_jax import sharding
from qwen2_jax.config import Qwen2Config
from qwen2_jax.train import chat_data, checkpointing, loop, metrics as metrics_lib
from qwen2_jax.train import step as step_lib
from qwen2_jax.train.loop import NONFINITE_MODES
from qwen2_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from qwen2_jax.train.pretrain import PretrainConfigError, _model_from_dict, read_recipe

# Model fields that are implementation settings (allowed as overrides of a config read from
# `init_from`); any other field means `model` describes the architecture itself.
_IMPLEMENTATION_FIELDS = {"dtype", "param_dtype", "logits_dtype", "scan_layers", "remat_policy",
                          "attention_impl", "moe_impl", "moe_capacity_factor"}


class PostTrainConfigError(PretrainConfigError):
  """A post-training setting is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostTrainConfig:
  model: Qwen2Config
  data: chat_data.ChatDataConfig
  optim: OptimConfig
  output_dir: str                      # checkpoints/, metrics.jsonl, tensorboard/, hf/
  init_from: str | None = None         # HF dir or Orbax params dir to start from
  tokenizer: str | None = None         # default: init_from (its tokenizer.json)
  steps: int | None = None             # None: data.num_epochs passes over the data
  auto_decay: bool = True              # decay_steps = steps - warmup_steps
  mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
  rules: Any = "fsdp"
  seed: int = 0
  accum_steps: int = 1                 # micro-batches per update (batch_size must divide)
  nonfinite: str = "skip"              # non-finite loss/grad: "skip" the update or "abort"
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  log_every: int = 10
  eval_every: int = 0                  # 0: no periodic evaluation; > 0 needs
                                       # data.eval_every_nth_example (the held-out examples)
  eval_batches: int | None = None      # per evaluation; None: every held-out batch
  export_hf: bool = True               # write output_dir/hf (+ the tokenizer files) at the end
  peak_flops: float | None = None      # per device, for MFU (see train.metrics)
  progress: bool = True

  def __post_init__(self):
    if self.steps is not None and self.steps <= 0:
      raise PostTrainConfigError(f"steps: must be positive or null, got {self.steps}")
    if self.nonfinite not in NONFINITE_MODES:
      raise PostTrainConfigError(f"nonfinite: {self.nonfinite!r} is not one of {NONFINITE_MODES}")
    if self.accum_steps <= 0 or self.data.batch_size % self.accum_steps:
      raise PostTrainConfigError(f"accum_steps: {self.accum_steps} must divide "
                                 f"data.batch_size={self.data.batch_size}")
    for name in ("checkpoint_every", "log_every", "keep_checkpoints"):
      if getattr(self, name) <= 0:
        raise PostTrainConfigError(f"{name}: must be positive")
    if self.eval_every < 0 or (self.eval_every and not self.data.eval_every_nth_example):
      raise PostTrainConfigError(f"eval_every: {self.eval_every} needs >= 0, and > 0 needs "
                                 f"data.eval_every_nth_example > 0 (the held-out examples)")
    if self.eval_batches is not None and self.eval_batches <= 0:
      raise PostTrainConfigError("eval_batches: must be positive or null")
    if self.tokenizer is None and self.init_from is None:
      raise PostTrainConfigError("tokenizer: required when there is no init_from to take it from")

  def job_fingerprint(self) -> dict[str, Any]:
    return {}

  def fingerprint(self, optim: OptimConfig) -> dict[str, Any]:
    """What a resuming run must share with the run that wrote the checkpoint."""
    model = {k: v for k, v in self.model.to_dict().items() if k != "remat_policy"}
    return checkpointing.fingerprint_of(model=model, data=dataclasses.asdict(self.data),
                                        optim=dataclasses.asdict(optim), seed=self.seed,
                                        accum_steps=self.accum_steps, init_from=self.init_from,
                                        **self.job_fingerprint())


def _resolve_model(d: Any, init_from: str | None) -> Qwen2Config:
  """`model` as a preset / full dict, or (absent, or implementation settings only) the config
  stored with `init_from` plus those settings."""
  if isinstance(d, Qwen2Config):
    return d
  d = dict(d or {})
  if "preset" in d or not set(d) <= _IMPLEMENTATION_FIELDS:
    return _model_from_dict(d)
  if init_from is None:
    raise PostTrainConfigError("model: give a preset or every field, or set init_from to read "
                               "the model config from")
  from qwen2_jax.checkpoint import orbax_io

  if os.path.isdir(os.path.join(init_from, orbax_io.PARAMS_DIR)):
    return orbax_io.load_orbax_config(init_from, **d)
  return Qwen2Config.from_hf(init_from, **d)


def config_from_dict(cls: type, d: dict[str, Any]) -> PostTrainConfig:
  """Builds a `cls` (a `PostTrainConfig` subclass) from a parsed YAML/JSON dict; strict."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise PostTrainConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: "
                               f"{sorted(names)}")
  d = dict(d)
  for key in ("tokenizer", "output_dir", "init_from", "reference_from"):  # `$VARS`, `~`
    if isinstance(d.get(key), str):
      d[key] = os.path.expandvars(os.path.expanduser(d[key]))
  d["model"] = _resolve_model(d.get("model"), d.get("init_from"))
  d["data"] = chat_data.ChatDataConfig.from_dict(d.get("data", {}))
  d["optim"] = OptimConfig.from_dict(d.get("optim", {}))
  if "mesh" in d and not isinstance(d["mesh"], sharding.MeshConfig):
    d["mesh"] = sharding.MeshConfig.from_dict(d["mesh"])
  try:
    return cls(**d)
  except TypeError as e:
    raise PostTrainConfigError(str(e)) from None


def load_config(cls: type, path: str, overrides: list[str] = ()) -> PostTrainConfig:
  return config_from_dict(cls, read_recipe(path, overrides))



# ----------------------------------------------------------------------------- the run

class Job:
  """What SFT and DPO plug into `run`. Subclasses set `name`, `rows_per_example` and
  `metric_names`, and implement the methods below."""
  name = "job"
  rows_per_example = 1            # batch rows per data.batch_size unit (DPO: 2 per pair)
  metric_names: tuple[str, ...] = ()
  flops_factor = 1.0              # model FLOPs per row token, relative to a training step

  def __init__(self, cfg: PostTrainConfig):
    self.cfg = cfg

  def build_dataset(self, tokenizer) -> Any:
    """The training examples; their `held_out` dataset (or None) is what `evaluate` reads."""
    raise NotImplementedError

  def prepare(self, mesh, rules, initial_params, params0, resumed: bool) -> None:
    """Called once before the train state exists (fresh run: `params0` are the initial params,
    still undonated) or after it was restored (`params0` None); `initial_params()` rebuilds
    the initial params."""

  def make_step(self, optimizer, mesh, rules):
    raise NotImplementedError

  def step(self, step_fn, state, batch):
    return step_fn(state, batch)

  def host_batch(self, batch: dict[str, Any], example_index, held_out: bool = False
                 ) -> dict[str, Any]:
    """The host batch the step (or, `held_out`, the eval step) takes."""
    return batch

  def make_eval_step(self, mesh, rules):
    """Jitted (params, batch) -> replicated sums over the batch (for `eval_result`)."""
    raise NotImplementedError

  def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
    """Sums over the held-out batches -> the logged `eval/...` values."""
    raise NotImplementedError


def evaluate(job: Job, eval_step, state, mesh, rules) -> dict[str, float]:
  """The job's eval metrics over (up to `eval_batches` batches of) its held-out examples, in
  file order, one pass; the last batch is padded like training batches (padding weighs 0)."""
  def one(host):
    index = host.pop("example_index")
    batch = sharding.host_local_batch(job.host_batch(host, index, held_out=True), mesh, rules)
    return eval_step(state.params, batch)

  batches = job.dataset.held_out.iterator(jax.process_index(), jax.process_count())
  return job.eval_result(loop.sum_eval_outputs(one, batches, job.cfg.eval_batches))


def run(job: Job) -> dict[str, Any]:
  """Runs (or resumes) a post-training job; returns a summary dict (also in metrics.jsonl)."""
  from qwen2_jax.tokenizer import load_tokenizer

  cfg = job.cfg
  mesh = sharding.make_mesh(cfg.mesh)
  rules = sharding.get_rules(cfg.rules)
  shards = sharding.num_batch_shards(mesh, rules)
  rows = cfg.data.batch_size * job.rows_per_example // cfg.accum_steps
  if rows % shards or cfg.data.batch_size % jax.process_count():
    raise PostTrainConfigError(
        f"data.batch_size={cfg.data.batch_size} ({rows} rows per micro-batch) cannot be split "
        f"over the mesh's {shards} batch shards ({dict(mesh.shape)}) and "
        f"{jax.process_count()} processes")
  tokenizer_path = cfg.tokenizer or cfg.init_from
  tokenizer = load_tokenizer(tokenizer_path)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise PostTrainConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                               f"tokenizer's {tokenizer.vocab_size} ids")
  dataset = job.dataset = job.build_dataset(tokenizer)
  total = dataset.total_batches
  steps = cfg.steps or total
  if steps > total:
    raise PostTrainConfigError(f"steps={steps} exceeds the data: {total} batches in "
                               f"data.num_epochs={cfg.data.num_epochs}")
  optim = cfg.optim
  if cfg.auto_decay:
    optim = dataclasses.replace(optim, decay_steps=max(steps - optim.warmup_steps, 1))
  optimizer, schedule = make_optimizer(optim), learning_rate_schedule(optim)
  os.makedirs(cfg.output_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                    keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  fingerprint = cfg.fingerprint(optim)
  iterator = dataset.iterator(jax.process_index(), jax.process_count())
  rng = jax.random.key(cfg.seed)
  rng, init_rng = jax.random.split(rng)

  def initial_params():
    params = loop.load_initial_params(cfg.model, cfg.init_from, mesh, rules,
                                      progress=cfg.progress)
    if params is None:
      params = sharding.init_params_sharded(cfg.model, init_rng, mesh, rules)
    return params

  latest = ckpt.latest_step()
  if latest is not None:
    abstract = step_lib.abstract_train_state(cfg.model, optimizer, mesh, rules)
    state, data_state, rng, _ = ckpt.restore(latest, abstract, fingerprint=fingerprint)
    iterator.set_state(data_state)
    job.prepare(mesh, rules, initial_params, None, resumed=True)
    start = latest
  else:
    params0 = initial_params()
    job.prepare(mesh, rules, initial_params, params0, resumed=False)
    state = step_lib.init_train_state_sharded(cfg.model, optimizer, init_rng, mesh, rules,
                                              params=params0)
    del params0
    start = 0
  step_fn = job.make_step(optimizer, mesh, rules)
  evaluate_fn = None
  if cfg.eval_every:
    eval_step = job.make_eval_step(mesh, rules)
    evaluate_fn = lambda s: evaluate(job, eval_step, s, mesh, rules)

  def next_batch():
    host = next(iterator)
    example_index = host.pop("example_index")
    return sharding.host_local_batch(job.host_batch(host, example_index), mesh, rules)

  data_summary = {"examples": len(dataset.examples), "dropped_too_long": dataset.num_dropped,
                  "batches_available": total}
  if dataset.held_out is not None:
    data_summary["held_out"] = len(dataset.held_out.examples)
  run_log = loop.RunLog(cfg, ckpt, steps=steps, start=start)
  try:
    if start == 0:
      run_log.write({"data": data_summary})
    if dataset.num_dropped:
      run_log.note(f"{job.name}: dropped {dataset.num_dropped} examples longer than "
                   f"seq_len={cfg.data.seq_len} (too_long: drop)")
    result = loop.train_loop(
        cfg, run_log, state=state, rng=rng, start=start, steps=steps, next_batch=next_batch,
        train_step=lambda s, b: job.step(step_fn, s, b), data_state=iterator.get_state,
        schedule=schedule, fingerprint=fingerprint,
        tokens_per_step=cfg.data.batch_size * job.rows_per_example * cfg.data.seq_len,
        flops_per_token=job.flops_factor * metrics_lib.flops_per_token(cfg.model,
                                                                       cfg.data.seq_len),
        metric_names=job.metric_names, evaluate=evaluate_fn)
    state = result.state
    summary = {"job": job.name, "final_step": int(state.step), "steps": steps,
               "data": data_summary, "first_logged": result.first, "last": result.last,
               "skipped": int(state.skipped), "stopped_by": result.stopped,
               "checkpoints": ckpt.all_steps()}
    return loop.finish(cfg, run_log, result, steps, summary, tokenizer=tokenizer_path)
  finally:
    run_log.close()
