"""One runner for every training job (pretraining, SFT, DPO): run settings, restore-or-init, loop.

`run(job)` does what every job does: build the mesh and sharding rules; check that the batch
splits over them and that the model's vocabulary holds the tokenizer's ids; open the job's data;
make the optimizer and the checkpointer; resume from the latest committed checkpoint, or start
from `init_from` (an HF or Orbax directory) or a random init (`seed`); step through
`train.loop.train_loop`; export HF safetensors at the end. A job (`train.pretrain.PretrainJob`,
`train.sft.SFTJob`, `train.dpo.DPOJob`, `train.rm.RMJob`, `train.grpo.GRPOJob`,
`train.online_dpo.OnlineDPOJob`) brings only what differs: its recipe dataclass (`RunSettings`
plus its data and objective settings), its data, its train and eval steps, and the metrics it
logs; a job whose params are not the causal LM's (the reward model's) also brings how to init,
load and restore them (`Job.init_state` and its siblings), and an online job (`train.online`),
whose step samples from the policy before it updates, keeps its batches on the host
(`Job.place_batch`) and takes several updates per step (`Job.updates_per_step`).

Recipes: `RunSettings.load(path, overrides)` reads YAML (`typed_config.read_recipe`, `--set
a.b=v` overrides) and builds the job's dataclass with `typed_config.structure`: typed, strict,
one-line `ConfigError`s naming the setting and the file:line or `--set` it came from. `model` is
a preset plus overrides (`{preset: qwen2-7b, dtype: bfloat16}`) or every field; absent, or
holding only implementation settings (`config.RUNTIME_FIELDS`), it is read from `init_from`.
`tokenizer` defaults to `init_from` (its tokenizer files).

Fingerprint, one rule for every job: each checkpoint stores the job's name, the model (all but
the memory levers `MEMORY_ONLY_FIELDS`), the optimizer settings as applied (after `auto_decay`),
`seed`, `init_from`, `accum_steps` and every setting the job's dataclass adds to `RunSettings`
(its data, its objective); a run resumes from a checkpoint only when its own fingerprint is
equal, so a changed seed, starting point, data or objective is refused instead of silently
diverging. The other run settings (steps, mesh, rules, logging, checkpointing, evaluation,
export) may change on resume.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, Iterable, Mapping

import jax

from qwen2_jax import checkpoint, flops, presets, sharding
from qwen2_jax.config import RUNTIME_FIELDS, Qwen2Config
from qwen2_jax.errors import UserError
from qwen2_jax.tokenizer import load_tokenizer
from qwen2_jax.train import checkpointing, loop, step as step_lib
from qwen2_jax.train.loop import NONFINITE_MODES
from qwen2_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from qwen2_jax.typed_config import Bool, ConfigError, Float, Int, Recipe, read_recipe, structure

# Model settings that change what is kept in memory, not the math: free to change on resume.
MEMORY_ONLY_FIELDS = ("remat_policy", "loss_chunk_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings:
  """The settings every job shares; a job's dataclass adds `data` and its objective's."""
  job_name: ClassVar[str] = "job"      # in the fingerprint
  path_fields: ClassVar[tuple[str, ...]] = ("tokenizer", "output_dir", "init_from")

  model: Qwen2Config
  data: Any                            # the job's data settings (a dataclass with batch_size)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  output_dir: str                      # checkpoints/, metrics.jsonl, tensorboard/, hf/
  steps: Int | None = None             # optimizer steps of the run; None: one pass over what
                                       # the data hold (jobs with endless data require it)
  tokenizer: str | None = None         # tokenizer.json / HF dir / SentencePiece .model;
                                       # None: init_from's tokenizer files
  init_from: str | None = None         # HF dir or Orbax params dir: start from these weights
  mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
  rules: Any = "fsdp"                  # preset name, JSON file or a table (`sharding.get_rules`)
  seed: Int = 0                        # the random init (data have their own seed)
  accum_steps: Int = 1                 # micro-batches per update (must divide data.batch_size)
  auto_decay: Bool = False             # decay over exactly the run: decay_steps = steps - warmup
  nonfinite: str = "skip"              # non-finite loss/grad: "skip" the update or "abort"
  checkpoint_every: Int = 100
  keep_checkpoints: Int = 3
  async_checkpoint: Bool = True
  eval_every: Int = 0                  # 0: no periodic evaluation on held-out data
  eval_batches: Int | None = None      # per evaluation; None: every held-out batch
  log_every: Int = 10
  export_hf: Bool = True               # write output_dir/hf (+ the tokenizer files) at the end
  peak_flops: Float | None = None      # per device, for MFU; None: the chip's spec sheet, or a
                                       # measured matmul rate on CPU
  progress: Bool = True

  def __post_init__(self):
    def bad(name: str, rule: str):
      raise ConfigError(f"{type(self).__name__}.{name}: {rule}, got {getattr(self, name)!r}")
    if self.steps is not None and self.steps <= 0:
      bad("steps", "must be positive")
    if self.accum_steps <= 0 or self.data.batch_size % self.accum_steps:
      bad("accum_steps", f"must divide data.batch_size={self.data.batch_size}")
    if self.nonfinite not in NONFINITE_MODES:
      bad("nonfinite", f"must be one of {NONFINITE_MODES}")
    for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
      if getattr(self, name) <= 0:
        bad(name, "must be positive")
    if self.eval_every < 0:
      bad("eval_every", "must be >= 0")
    if self.eval_batches is not None and self.eval_batches <= 0:
      bad("eval_batches", "must be positive or null")
    if self.peak_flops is not None and not self.peak_flops > 0:
      bad("peak_flops", "must be > 0 or null")
    if self.tokenizer is None and self.init_from is None:
      bad("tokenizer", "is required when there is no init_from to take it from")

  def run_optim(self, steps: int) -> OptimConfig:
    """The optimizer settings of a run of `steps` steps (`auto_decay`: decay over exactly it)."""
    if not self.auto_decay:
      return self.optim
    return dataclasses.replace(self.optim, decay_steps=max(steps - self.optim.warmup_steps, 1))

  def fingerprint(self, steps: int) -> dict[str, Any]:
    """What a resuming run must share with the run that wrote the checkpoint (module docstring)."""
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    own = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
           if f.name not in shared or f.name == "data"}
    model = {k: v for k, v in self.model.to_dict().items() if k not in MEMORY_ONLY_FIELDS}
    return checkpointing.fingerprint_of(
        job=self.job_name, model=model, optim=dataclasses.asdict(self.run_optim(steps)),
        seed=self.seed, init_from=self.init_from, accum_steps=self.accum_steps, **own)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, recipe: Recipe | None = None):
    """`cls` from a parsed recipe (`recipe`: where its values came from, for errors)."""
    if not isinstance(d, Mapping):
      return structure(cls, d, recipe=recipe)  # names the bad type
    d = dict(d)
    for key in cls.path_fields:  # `~` and `$VARS` in paths
      if isinstance(d.get(key), str):
        d[key] = os.path.expandvars(os.path.expanduser(d[key]))
    d["model"] = resolve_model(d.get("model"), d.get("init_from"), recipe)
    if "mesh" in d:
      d["mesh"] = sharding.MeshConfig.from_dict(d["mesh"], path="mesh", recipe=recipe)
    return structure(cls, d, recipe=recipe)

  @classmethod
  def load(cls, path: str, overrides: Iterable[str] = ()):
    """`cls` from a YAML recipe file with `a.b.c=value` overrides."""
    recipe = read_recipe(path, overrides)
    return cls.from_dict(recipe.data, recipe=recipe)


def _plain(value: Any) -> Any:
  return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _where(recipe: Recipe | None, *keys: str) -> str:
  where = recipe.where(keys) if recipe is not None else None
  return f"{where}: " if where else ""


def resolve_model(d: Any, init_from: str | None, recipe: Recipe | None = None) -> Qwen2Config:
  """The run's model: `d` as a preset plus overrides or every field, or (absent, or only
  implementation settings) the config stored with `init_from` plus those settings."""
  if isinstance(d, Qwen2Config):
    return d
  if d is None:
    d = {}
  if not isinstance(d, Mapping) or "preset" in d or not set(d) <= set(RUNTIME_FIELDS):
    return presets.config_from_dict(d, path="model", recipe=recipe)
  if init_from is None:
    raise ConfigError(f"{_where(recipe, 'model')}model: give a preset or every field, or set "
                      f"init_from to read the model config from")
  _check_path("init_from", init_from)
  return checkpoint.load_config(init_from, **d)


def _check_path(field: str, path: str) -> None:
  """A local path a setting names must exist (remote `scheme://` paths are left to readers)."""
  if "://" not in path and not os.path.exists(path):
    raise UserError(f"{field}: {path} does not exist")


def load_params(model: Qwen2Config, path: str, mesh, rules, *, progress: bool = True) -> Any:
  """The weights of the checkpoint at `path` (HF or Orbax) as `model`'s params, placed in
  their shardings."""
  _, params = checkpoint.load(path, dtype=model.param_dtype, progress=progress,
                              shardings=sharding.param_shardings(model, mesh, rules))
  return params


# ----------------------------------------------------------------------------- jobs

@dataclasses.dataclass
class Data:
  """A job's examples as the runner uses them."""
  iterator: Any                        # next() -> host batch; get_state() (JSON-able) / set_state
  total_batches: int | None = None     # batches in the data; None: endless (`steps` required)
  held_out: Callable[[], Iterable[dict[str, Any]]] | None = None  # a new pass over eval batches
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # logged and summarised
  note: str | None = None              # printed above the progress bar at the start


class Job:
  """What one kind of training brings to `run`. Subclasses set the class attributes and
  implement `open_data`, `make_step` and `make_eval_step`."""
  config: ClassVar[type[RunSettings]] = RunSettings  # the recipe's dataclass
  name: ClassVar[str] = "job"
  rows_per_example: ClassVar[int] = 1  # batch rows per data.batch_size unit (DPO: 2 per pair)
  metric_names: ClassVar[tuple[str, ...]] = ()  # logged besides loss and grad_norm
  updates_per_step: int = 1            # optimizer updates per step (online jobs: per round)
  held_out_setting: ClassVar[str] = "data.eval_every_nth_example"  # what holds out eval data

  def __init__(self, cfg: RunSettings):
    self.cfg = cfg

  def open_data(self, tokenizer) -> Data:
    raise NotImplementedError

  # The params: the causal LM's (`qwen2_jax.api`). A job training other params (the reward
  # model's, `train.rm`) overrides these four.
  def abstract_state(self, optimizer, mesh, rules) -> step_lib.TrainState:
    """The train state as sharded `ShapeDtypeStruct`s (to restore a checkpoint into)."""
    return step_lib.abstract_train_state(self.cfg.model, optimizer, mesh, rules)

  def init_state(self, optimizer, rng, mesh, rules, params=None) -> step_lib.TrainState:
    """A fresh train state in its shards: `params` (placed), or a random init from `rng`."""
    return step_lib.init_train_state_sharded(self.cfg.model, optimizer, rng, mesh, rules,
                                             params=params)

  def random_params(self, rng, mesh, rules) -> Any:
    """The random init from `rng` (what `init_state` starts from without `params`)."""
    return sharding.init_params_sharded(self.cfg.model, rng, mesh, rules)

  def load_params(self, path: str, mesh, rules) -> Any:
    """The weights of the checkpoint at `path` (`init_from`), placed in their shardings."""
    return load_params(self.cfg.model, path, mesh, rules, progress=self.cfg.progress)

  def flops_per_token(self) -> float:
    """Model FLOPs per batch token of one training step (for MFU)."""
    return flops.train_flops_per_token(self.cfg.model, self.cfg.data.seq_len)

  def prepare(self, mesh, rules, initial_params: Callable[[], Any], resumed: bool) -> None:
    """Called once the train state exists. `initial_params()`: the run's initial weights (on a
    fresh run the state's own params, which the first step donates: copy to keep them)."""

  def host_batch(self, batch: dict[str, Any], held_out: bool = False) -> dict[str, Any]:
    """A batch of the data's iterator (or, `held_out`, of `Data.held_out`) as the step takes it."""
    return batch

  def place_batch(self, batch: dict[str, Any], mesh, rules) -> Any:
    """A host batch (this process's rows) as the step takes it: global arrays on the mesh
    (an online job keeps its prompt indices on the host)."""
    return sharding.host_local_batch(batch, mesh, rules)

  def make_step(self, optimizer, mesh, rules) -> Callable[[Any, Any], tuple[Any, dict]]:
    """Jitted (state, batch) -> (state, metrics with loss, grad_norm, finite, metric_names)."""
    raise NotImplementedError

  def make_eval_step(self, mesh, rules) -> Callable[[Any, Any], dict]:
    """Jitted (params, batch) -> replicated sums over the batch (for `eval_result`)."""
    raise NotImplementedError

  def eval_result(self, sums: dict[str, float]) -> dict[str, float]:
    """Sums over the held-out batches -> the logged `eval/...` values."""
    return loop.lm_eval_result(sums)


# ----------------------------------------------------------------------------- the run

def _open_tokenizer(cfg: RunSettings):
  field = "tokenizer" if cfg.tokenizer is not None else "init_from (the tokenizer)"
  path = cfg.tokenizer or cfg.init_from
  _check_path(field, path)
  try:
    tokenizer = load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise UserError(f"{field}: {e}") from None
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                      f"{tokenizer.vocab_size} ids of the tokenizer at {path}")
  return tokenizer


def _check_batch_split(cfg: RunSettings, rows_per_example: int, mesh, rules) -> None:
  shards = sharding.num_batch_shards(mesh, rules)
  rows = cfg.data.batch_size * rows_per_example // cfg.accum_steps
  if rows % shards or cfg.data.batch_size % jax.process_count():
    raise ConfigError(
        f"data.batch_size: {cfg.data.batch_size} (/ accum_steps={cfg.accum_steps}: {rows} rows "
        f"per micro-batch) does not split over the mesh's {shards} batch shards "
        f"({dict(mesh.shape)}) and {jax.process_count()} processes")


def _run_steps(cfg: RunSettings, total_batches: int | None) -> int:
  if total_batches is None:
    if cfg.steps is None:
      raise ConfigError("steps: required (the data repeat without end)")
    return cfg.steps
  if cfg.steps is not None and cfg.steps > total_batches:
    raise ConfigError(f"steps: {cfg.steps} exceeds the data: {total_batches} batches in "
                      f"data.num_epochs={cfg.data.num_epochs}")
  return cfg.steps or total_batches


def evaluate(job: Job, data: Data, eval_step, state, mesh, rules) -> dict[str, float]:
  """The job's eval metrics over (up to `eval_batches` batches of) its held-out data."""
  def one(host):
    return eval_step(state.params, job.place_batch(job.host_batch(host, held_out=True), mesh,
                                                   rules))
  return job.eval_result(loop.sum_eval_outputs(one, data.held_out(), job.cfg.eval_batches))


def run(job: Job) -> dict[str, Any]:
  """Runs (or resumes) `job`; returns the run summary (also the last line of metrics.jsonl)."""
  cfg = job.cfg
  for field in cfg.path_fields:
    if field != "output_dir" and getattr(cfg, field) is not None:
      _check_path(field, getattr(cfg, field))
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.get_rules(cfg.rules)
  _check_batch_split(cfg, job.rows_per_example, mesh, rules)
  tokenizer = _open_tokenizer(cfg)
  data = job.open_data(tokenizer)
  if cfg.eval_every and data.held_out is None:
    raise ConfigError(f"eval_every: {cfg.eval_every} needs held-out data: set "
                      f"{job.held_out_setting} > 0")
  steps = _run_steps(cfg, data.total_batches)
  optim = cfg.run_optim(steps)
  optimizer, schedule = make_optimizer(optim), learning_rate_schedule(optim)
  fingerprint = cfg.fingerprint(steps)
  os.makedirs(cfg.output_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                    keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  try:  # until RunLog owns the checkpointer: close it if setting up fails
    init_rng = jax.random.split(jax.random.key(cfg.seed))[1]

    def load_initial():
      return job.load_params(cfg.init_from, mesh, rules)

    start = ckpt.latest_step() or 0
    if start:
      abstract = job.abstract_state(optimizer, mesh, rules)
      state, data_state, _ = ckpt.restore(start, abstract, fingerprint=fingerprint)
      data.iterator.set_state(data_state)
      initial_params = (load_initial if cfg.init_from else
                        lambda: job.random_params(init_rng, mesh, rules))
    else:
      state = job.init_state(optimizer, init_rng, mesh, rules,
                             params=load_initial() if cfg.init_from else None)
      initial_params = lambda params=state.params: params
    job.prepare(mesh, rules, initial_params, resumed=bool(start))
    train_step = job.make_step(optimizer, mesh, rules)
    evaluate_fn = None
    if cfg.eval_every:
      eval_step = job.make_eval_step(mesh, rules)
      evaluate_fn = lambda s: evaluate(job, data, eval_step, s, mesh, rules)

    def next_batch():
      try:
        host = next(data.iterator)
      except StopIteration:
        raise ConfigError(f"steps={steps} runs past the data (data.num_epochs="
                          f"{getattr(cfg.data, 'num_epochs', None)}); lower steps or raise "
                          f"data.num_epochs") from None
      return job.place_batch(job.host_batch(host), mesh, rules)
  except BaseException:
    ckpt.close()
    raise

  log = loop.RunLog(cfg, ckpt, steps=steps, start=start)
  try:
    if start == 0 and data.summary:
      log.write({"data": data.summary})
    if data.note:
      log.note(data.note)
    result = loop.train_loop(
        cfg, log, state=state, start=start, steps=steps, next_batch=next_batch,
        train_step=train_step, data_state=data.iterator.get_state, schedule=schedule,
        fingerprint=fingerprint,
        tokens_per_step=cfg.data.batch_size * job.rows_per_example * cfg.data.seq_len,
        flops_per_token=job.flops_per_token(), metric_names=job.metric_names,
        evaluate=evaluate_fn, updates_per_step=job.updates_per_step)
    summary = {"job": job.name, "final_step": int(result.state.step), "steps": steps,
               "first_logged": result.first, "last": result.last,
               "skipped": int(result.state.skipped), "stopped_by": result.stopped,
               "checkpoints": ckpt.all_steps()}
    if data.summary:
      summary["data"] = data.summary
    return loop.finish(cfg, log, result, steps, summary, tokenizer=cfg.tokenizer or cfg.init_from)
  finally:
    log.close()
