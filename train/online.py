"""What the online post-training jobs (GRPO, online DPO) share: prompts, rewards, rollouts.

A round of an online job: take the next `data.batch_size` prompts; sample responses to each from
the CURRENT policy with the continuous-batching engine (`qwen2_jax.infer.Engine`), which is
handed the trainer's params in memory (`Engine.update_params`: resharded on the mesh, no
checkpoint round trip; nothing recompiles between rounds); score them with the configured
rewards; then the job's optimizer updates. Rollouts and training alternate in one process.

Data. JSONL lines with `prompt` (a string, the user turn) or `messages` (the conversation so
far, ending with a user / system / tool turn); every other key of the line (e.g. `answer` for
the math reward, `tests` for the code reward) is the example's metadata, passed to the rewards.
Prompts are encoded in ChatML with the assistant header, as `qwen2-jax generate --chat` does.
A training row holds prompt + response minus one token (the last token is only a target), so a
prompt of more than `data.seq_len` + 1 - `rollout.max_new_tokens` tokens is dropped and counted
(`data.too_long: drop`) or refused (`error`); responses are never truncated to fit. The data position is checkpointed like every job's.

Sampling. The response g of example i in round r uses the seed derived from (seed, r, i, g), so
a resumed run samples exactly what the uninterrupted one did. Responses end at `<|im_end|>` or
the tokenizer's EOS (the stop token is part of the response and is trained on) or at
`rollout.max_new_tokens` (finish reason "length", counted as `truncated`). The engine reports
each sampled token's log-probability under the policy's raw distribution (temperature 1, over
the model's whole vocabulary, so ids the tokenizer lacks may be sampled; they decode to
nothing); the objectives use the same distribution, so with `rollout.temperature` 1 (the
default) rollouts are on-policy.

Rewards (`rewards:` in the recipe, a list of terms, summed with their weights):

  - {type: math, weight: 1.0, fallback: last_number}     metadata["answer"], exact or numeric
  - {type: code, timeout_s: 10, memory_mb: 1024}           metadata["tests"], sandboxed
  - {type: function, function: "pkg.module:fn"}          fn(prompt, response, metadata)
  - {type: reward_model, path: runs/rm/hf, max_length: 2048}   a `qwen2-jax rm` model

Each term has its own `penalty` (the score of an example it cannot score: it raised, timed out,
broke the sandbox, gave a non-finite value; counted per source, never fatal) and `name`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import sharding
from qwen2_jax.errors import UserError
from qwen2_jax.tokenizer import ENDOFTEXT, IM_END, encode_chat
from qwen2_jax.train import chat_data, posttrain, rewards as rewards_lib, runner
from qwen2_jax.typed_config import Bool, ConfigError, Float, Int

REWARD_TYPES = ("math", "code", "function", "reward_model")
# The metrics of a round without an update (no response tokens): nothing moved.
NO_UPDATE = {"loss": 0.0, "grad_norm": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_fraction": 0.0,
             "ratio": 1.0, "finite": 1.0, **{k: 0.0 for k in (
                 "reward_accuracy", "rewards_chosen", "rewards_rejected", "rewards_margin",
                 "logps_chosen", "logps_rejected", "pairs")}}
PROMPT_KEYS = ("prompt", "messages")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardTerm:
  """One term of the reward (module docstring). Fields other than type / weight / penalty /
  name belong to one type each and are refused on the others."""
  type: str
  weight: Float = 1.0
  penalty: Float = 0.0                # the score of an example this term cannot score
  name: str | None = None             # in the metrics (reward/<name>); default: the type
  # math
  fallback: str | None = None         # no \boxed{}: "last_number" (default) or "none"
  tolerance: Float | None = None      # numeric match tolerance (default 1e-6)
  # code
  timeout_s: Float | None = None      # code: per run (default 10); function: per call (none)
  memory_mb: Int | None = None        # code: address-space limit (default 1024)
  workers: Int | None = None          # code: runs in parallel (default 4)
  # function
  function: str | None = None         # "package.module:function"
  # reward_model
  path: str | None = None             # a reward model directory (HF sequence classification)
  max_length: Int | None = None       # longest prompt + response scored (default data.seq_len)
  batch_size: Int | None = None       # rows per reward-model forward (default 32)

  _FIELDS = {"math": ("fallback", "tolerance"), "code": ("timeout_s", "memory_mb", "workers"),
             "function": ("function", "timeout_s"),
             "reward_model": ("path", "max_length", "batch_size")}

  def __post_init__(self):
    where = f"RewardTerm({self.name or self.type})"
    if self.type not in REWARD_TYPES:
      raise ConfigError(f"{where}.type: {self.type!r} is not one of {REWARD_TYPES}")
    own = self._FIELDS[self.type]
    for f in dataclasses.fields(self):
      if f.name in ("type", "weight", "penalty", "name") or f.name in own:
        continue
      if getattr(self, f.name) is not None:
        raise ConfigError(f"{where}.{f.name}: not a setting of a {self.type} reward (its "
                          f"settings: {', '.join(own)})")
    if self.type == "function" and not self.function:
      raise ConfigError(f"{where}.function: required ('package.module:function')")
    if self.type == "reward_model" and not self.path:
      raise ConfigError(f"{where}.path: required (a reward model directory)")
    for name in ("timeout_s", "memory_mb", "workers", "max_length", "batch_size"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ConfigError(f"{where}.{name}: must be > 0, got {value!r}")
    if self.fallback is not None and self.fallback not in rewards_lib.MathReward.FALLBACKS:
      raise ConfigError(f"{where}.fallback: {self.fallback!r} is not one of "
                        f"{rewards_lib.MathReward.FALLBACKS}")
    if self.tolerance is not None and not self.tolerance >= 0:
      raise ConfigError(f"{where}.tolerance: must be >= 0, got {self.tolerance!r}")

  @property
  def label(self) -> str:
    return self.name or self.type


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
  """How responses are sampled, and the engine that samples them."""
  num_generations: Int = 8            # responses per prompt (GRPO's group size G)
  max_new_tokens: Int = 256           # per response, the stop token included
  temperature: Float = 1.0            # 1: on-policy (see the module docstring)
  top_k: Int = 0
  top_p: Float = 1.0
  max_num_seqs: Int = 32              # engine: sequences decoded at once
  max_num_batched_tokens: Int = 512   # engine: tokens per step
  page_size: Int = 16
  num_pages: Int | None = None        # KV-cache pages; None: max_num_seqs full-length rows
  enable_prefix_caching: Bool = True  # the G samples of a prompt share its pages
  rules: Any = None                   # sharding rules of the engine; None: the run's rules

  def __post_init__(self):
    for name in ("num_generations", "max_new_tokens", "max_num_seqs", "max_num_batched_tokens",
                 "page_size"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"RolloutConfig.{name}: must be positive, got {getattr(self, name)!r}")
    if self.num_pages is not None and self.num_pages <= 0:
      raise ConfigError(f"RolloutConfig.num_pages: must be positive or null, got "
                        f"{self.num_pages!r}")
    if not self.temperature > 0:
      raise ConfigError(f"RolloutConfig.temperature: must be > 0 (online training samples), "
                        f"got {self.temperature!r}")
    if not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ConfigError(f"RolloutConfig: top_p must be in (0, 1] and top_k >= 0, got "
                        f"{self.top_p!r}, {self.top_k!r}")
    if self.max_num_batched_tokens < self.max_num_seqs:
      raise ConfigError(f"RolloutConfig.max_num_batched_tokens: {self.max_num_batched_tokens} "
                        f"is less than max_num_seqs ({self.max_num_seqs})")


def check_rewards(terms: Sequence[RewardTerm], owner: str) -> None:
  if not terms:
    raise ConfigError(f"{owner}.rewards: give at least one reward term (type: "
                      f"{', '.join(REWARD_TYPES)})")
  labels = [t.label for t in terms]
  if len(set(labels)) != len(labels):
    raise ConfigError(f"{owner}.rewards: names must be distinct, got {labels} (set name:)")


def check_rollout_fits(rollout: RolloutConfig, seq_len: int, owner: str) -> None:
  if rollout.max_new_tokens >= seq_len:
    raise ConfigError(f"{owner}.rollout.max_new_tokens: {rollout.max_new_tokens} leaves no room "
                      f"for a prompt in data.seq_len={seq_len}")
  need = -(-(seq_len + 1) // rollout.page_size)
  if rollout.num_pages is not None and rollout.num_pages < need:
    raise ConfigError(f"{owner}.rollout.num_pages: {rollout.num_pages} pages of "
                      f"{rollout.page_size} tokens cannot hold one sequence of data.seq_len + 1 = "
                      f"{seq_len + 1} tokens (needs {need})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineSettings(posttrain.ChatRunSettings):
  """The run settings of an online job (a base of `GRPOConfig`): prompts in `data`, the
  rollout engine, the rewards and the reference model's weights."""
  path_fields: ClassVar[tuple[str, ...]] = (*runner.RunSettings.path_fields, "reference_from")

  rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
  rewards: tuple[RewardTerm, ...] = ()
  reference_from: str | None = None   # the frozen reference's weights; default: the initial
                                      # policy

  def __post_init__(self):
    super().__post_init__()
    check_rewards(self.rewards, type(self).__name__)
    check_rollout_fits(self.rollout, self.data.seq_len, type(self).__name__)

  @property
  def updates_per_round(self) -> int:
    return 1

  def run_optim(self, steps: int):
    """With `auto_decay`, the schedule decays over every update of the run (several per
    round)."""
    return super().run_optim(steps * self.updates_per_round)


def _expand(path: str) -> str:
  return os.path.expandvars(os.path.expanduser(path))


def build_reward(terms: Sequence[RewardTerm], *, tokenizer, max_length: int,
                 default_system: str | None, mesh=None, rules=None, progress: bool = True
                 ) -> rewards_lib.WeightedSum:
  """The weighted sum of the recipe's reward terms (reward models loaded onto `mesh`)."""
  out = []
  for t in terms:
    kw = dict(penalty=t.penalty, name=t.label)
    if t.type == "math":
      reward = rewards_lib.MathReward(fallback=t.fallback or "last_number",
                                      tolerance=1e-6 if t.tolerance is None else t.tolerance,
                                      **kw)
    elif t.type == "code":
      reward = rewards_lib.CodeReward(timeout_s=t.timeout_s or 10.0,
                                      memory_mb=t.memory_mb or 1024, workers=t.workers or 4,
                                      **kw)
    elif t.type == "function":
      reward = rewards_lib.FunctionReward(t.function, timeout_s=t.timeout_s, **kw)
    else:
      from qwen2_jax import reward_model  # pylint: disable=import-outside-toplevel
      config, params = reward_model.load(_expand(t.path), mesh=mesh, rules=rules, progress=progress)
      reward = rewards_lib.RewardModelReward(
          config, params, tokenizer, max_length=t.max_length or max_length,
          batch_size=t.batch_size or 32, default_system=default_system, **kw)
    out.append((reward, t.weight))
  return rewards_lib.WeightedSum(out, name="reward")


# ----------------------------------------------------------------------------- prompts

class PromptDataset(chat_data._EpochDataset):  # pylint: disable=protected-access
  """Tokenised prompts (ids ending with the assistant header, text, metadata); a batch is
  `batch_size` example indices (`example_index` [B, 1], -1 for padding at the end of an
  epoch)."""

  def __init__(self, config: chat_data.ChatDataConfig, tokenizer, *, max_new_tokens: int):
    super().__init__()
    self.config = config
    examples, held_out = [], []  # (ids, prompt text, metadata)
    self.num_dropped = 0
    for k, (where, record) in enumerate(chat_data.read_jsonl(config.files())):
      example = encode_prompt(tokenizer, record, where, default_system=config.default_system)
      if len(example[0]) + max_new_tokens - 1 > config.seq_len:
        if config.too_long == "error":
          raise chat_data.ChatDataError(
              f"{where}: the prompt's {len(example[0])} tokens + rollout.max_new_tokens="
              f"{max_new_tokens} - 1 do not fit data.seq_len={config.seq_len}; raise seq_len, "
              f"lower max_new_tokens or set data.too_long: drop")
        self.num_dropped += 1
        continue
      (held_out if self._is_held_out(k) else examples).append(example)
    self._set_examples(examples, held_out, "prompts")

  def _epoch_rows(self, epoch):
    return [[int(i)] for i in self.order(epoch)]

  def _arrays(self, rows, n):
    index = np.full((n, 1), -1, np.int32)
    for r, members in enumerate(rows):
      if members:
        index[r, 0] = members[0]
    return {"example_index": index}


def encode_prompt(tokenizer, record: Mapping[str, Any], where: str, *,
                  default_system: str | None) -> tuple[np.ndarray, str, dict[str, Any]]:
  """A prompt line -> (ids with the assistant header, the prompt's text, metadata)."""
  if ("prompt" in record) == ("messages" in record):
    raise chat_data.ChatDataError(f"{where}: give exactly one of 'prompt' (a string) or "
                                  f"'messages'")
  if "prompt" in record:
    if not isinstance(record["prompt"], str):
      raise chat_data.ChatDataError(f"{where}: 'prompt' must be a string")
    messages = [{"role": "user", "content": record["prompt"]}]
    text = record["prompt"]
  else:
    messages = chat_data._messages(record, "messages", where)  # pylint: disable=W0212
    last = messages[-1].get("role") if isinstance(messages[-1], Mapping) else None
    if last not in chat_data.PROMPT_ROLES:
      raise chat_data.ChatDataError(f"{where}: the prompt's last message must be one of "
                                    f"{chat_data.PROMPT_ROLES}, got {last!r}")
    text = str(messages[-1].get("content", ""))
  try:
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True,
                      default_system=default_system)
  except ValueError as e:
    raise chat_data.ChatDataError(f"{where}: {e}") from None
  metadata = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
  if "messages" in record:
    metadata["messages"] = messages
  return np.asarray(ids, np.int32), text, metadata


# ----------------------------------------------------------------------------- rollouts

def sample_seed(seed: int, round_index: int, example: int, g: int) -> int:
  """The sampling seed of response g to example `example` in round `round_index`."""
  return int(np.random.SeedSequence([seed, round_index, example, g]).generate_state(1)[0])


@dataclasses.dataclass
class Rollouts:
  """One round's responses: row k = response k % G to prompt k // G (prompt-major)."""
  example_index: np.ndarray           # [P] the data's example of each prompt
  prompt_ids: list[np.ndarray]        # [P]
  output_ids: list[list[int]]         # [P * G]
  logprobs: list[list[float]]         # [P * G]
  finish_reasons: list[str]           # [P * G]
  texts: list[str]                    # [P * G] decoded responses (stop token dropped)
  rewards: np.ndarray                 # [P * G] f64
  terms: dict[str, np.ndarray]        # per reward term, [P * G]
  seconds: float                      # generation wall time
  reward_seconds: float
  reward_failures: int = 0            # examples that scored a penalty this round

  @property
  def group_size(self) -> int:
    return len(self.output_ids) // max(len(self.prompt_ids), 1)


def rows_of(prompts: Sequence[np.ndarray], outputs: Sequence[Sequence[int]],
            logprobs: Sequence[Sequence[float]], seq_len: int, group_size: int
            ) -> dict[str, np.ndarray]:
  """Training rows of prompt + response: row k holds prompts[k // group_size] then
  outputs[k]; `loss_mask` is 1 on the response's targets, `old_logps` their rollout
  log-probabilities (0 elsewhere). Every array is [R, seq_len]."""
  R = len(outputs)
  z = lambda dtype: np.zeros((R, seq_len), dtype)
  out = {"input_ids": z(np.int32), "targets": z(np.int32), "loss_mask": z(np.float32),
         "positions": z(np.int32), "segment_ids": z(np.int32), "old_logps": z(np.float32)}
  for k in range(R):
    prompt, response = prompts[k // group_size], list(outputs[k])
    ids = np.concatenate([prompt, np.asarray(response, np.int32)])
    n = len(ids) - 1
    if n > seq_len:
      raise ValueError(f"row {k}: {n} positions do not fit seq_len={seq_len}")
    P = len(prompt)
    out["input_ids"][k, :n] = ids[:-1]
    out["targets"][k, :n] = ids[1:]
    out["positions"][k, :n] = np.arange(n)
    out["segment_ids"][k, :n] = 1
    out["loss_mask"][k, P - 1:n] = 1.0
    out["old_logps"][k, P - 1:n] = np.asarray(logprobs[k], np.float32)
  return out


def pad_rows(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
  """Rows padded with empty ones (no response tokens) to n."""
  have = len(rows["input_ids"])
  if have > n:
    raise ValueError(f"{have} rows, more than the batch's {n}")
  return {k: np.concatenate([v, np.zeros((n - have, *v.shape[1:]), v.dtype)])
          for k, v in rows.items()}


def host_value(x: jax.Array) -> np.ndarray:
  """A replicated or batch-sharded array's full value on this process (one process)."""
  return np.asarray(jax.device_get(x))


class OnlineJob(posttrain.ChatJob):
  """The rollout side of an online job (module docstring). Subclasses set the objective:
  `make_step`, `metric_names`. The recipe has `rollout` and `rewards` (or `online.rollout`
  and `online.rewards`: `online_settings`)."""
  held_out_setting = "data.eval_every_nth_example"

  def __init__(self, cfg):
    super().__init__(cfg)
    settings = self.online_settings()
    self.rollout_cfg: RolloutConfig = settings.rollout
    self.reward_terms: tuple[RewardTerm, ...] = tuple(settings.rewards)
    self.engine = None
    self.reward: rewards_lib.WeightedSum | None = None
    self.tokenizer = None
    for t in self.reward_terms:  # before the run makes any directory
      if t.type == "reward_model":
        runner._check_path(f"rewards.{t.label}.path", _expand(t.path))  # pylint: disable=W0212

  def online_settings(self):
    return self.cfg

  # ----- data
  examples_name = "prompts"

  def make_dataset(self, tokenizer):
    self.tokenizer = tokenizer
    return PromptDataset(self.cfg.data, tokenizer, max_new_tokens=self.rollout_cfg.max_new_tokens)

  def dropped_note(self, n: int) -> str:
    return (f"{self.name}: dropped {n} prompts whose prompt + rollout.max_new_tokens do not fit "
            f"data.seq_len={self.cfg.data.seq_len}")

  def host_batch(self, batch, held_out=False):
    return batch

  def place_batch(self, batch, mesh, rules):
    return batch  # example indices stay on the host: the step samples from them

  # ----- engine and rewards
  def stop_ids(self) -> tuple[int, ...]:
    ids = {self.tokenizer.token_to_id(IM_END), self.tokenizer.token_to_id(ENDOFTEXT),
           self.tokenizer.eos_id}
    return tuple(sorted(i for i in ids if i is not None))

  def reference_params(self, mesh, rules, initial_params, resumed: bool):
    """The frozen reference: `reference_from`'s weights, else a copy of the initial policy."""
    if self.cfg.reference_from is not None:
      return runner.load_params(self.cfg.model, self.cfg.reference_from, mesh, rules,
                                progress=self.cfg.progress)
    ref = initial_params()
    if not resumed:
      # The initial policy is the fresh train state's params, which the first step donates.
      shardings = sharding.param_shardings(self.cfg.model, mesh, rules)
      ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(ref)
    return ref

  def start_rollouts(self, mesh, rules) -> None:
    """Loads the rewards; the engine is made on the run's mesh at the first rollout (its
    programs compile then, once)."""
    if jax.process_count() > 1:
      raise UserError(f"{self.name}: rollouts run in one process; multi-process online "
                      f"training is not supported yet")
    self._mesh, self._rules = mesh, rules
    self.reward = build_reward(self.reward_terms, tokenizer=self.tokenizer,
                               max_length=self.cfg.data.seq_len,
                               default_system=self.cfg.data.default_system, mesh=mesh,
                               rules=rules, progress=self.cfg.progress)

  def _make_engine(self, params):
    from qwen2_jax.infer.engine import Engine  # pylint: disable=import-outside-toplevel
    r = self.rollout_cfg
    max_context = self.cfg.data.seq_len + 1
    pages_per_seq = -(-max_context // r.page_size)
    return Engine(
        self.cfg.model, params, max_num_seqs=r.max_num_seqs,
        max_num_batched_tokens=r.max_num_batched_tokens, page_size=r.page_size,
        num_pages=r.num_pages or r.max_num_seqs * pages_per_seq,
        enable_prefix_caching=r.enable_prefix_caching, max_context=max_context,
        eos_token_ids=self.stop_ids(), mesh=self._mesh, rules=r.rules or self._rules)

  def rollout(self, params, example_index: np.ndarray, round_index: int, *,
              greedy: bool = False, held_out: bool = False) -> Rollouts:
    """Samples rollout.num_generations responses (one greedy response when `greedy`) to each
    example of `example_index` (of the held-out prompts when `held_out`; -1 entries are
    skipped) with `params`, and scores them."""
    from qwen2_jax.infer.sampling import SamplingParams  # pylint: disable=C0415
    r = self.rollout_cfg
    G = 1 if greedy else r.num_generations
    index = np.asarray([int(i) for i in example_index if i >= 0], np.int64)
    dataset = self.dataset.held_out if held_out else self.dataset
    examples = [dataset.examples[i] for i in index]
    prompts, requests = [], []
    for i, (ids, _, _) in zip(index, examples):
      prompts.append(ids)
      for g in range(G):
        sp = SamplingParams(max_new_tokens=r.max_new_tokens,
                            temperature=0.0 if greedy else r.temperature,
                            top_k=r.top_k, top_p=r.top_p,
                            seed=sample_seed(self.cfg.seed, round_index, int(i), g))
        requests.append((ids.tolist(), sp))
    t0 = time.perf_counter()
    if self.engine is None:
      self.engine = self._make_engine(params)
    else:
      self.engine.update_params(params)
    results = self.engine.generate([ids for ids, _ in requests], [sp for _, sp in requests])
    seconds = time.perf_counter() - t0
    stops = set(self.stop_ids())
    texts = []
    for res in results:
      out = res.output_ids[:-1] if res.finish_reason == "stop" and res.output_ids and \
          res.output_ids[-1] in stops else res.output_ids
      texts.append(self.tokenizer.decode(out, skip_special_tokens=True))
    t1 = time.perf_counter()
    prompt_texts = [text for _, text, _ in examples for _ in range(G)]
    metadata = [meta for _, _, meta in examples for _ in range(G)]
    before = self._failures()
    scores = self.reward(prompt_texts, texts, metadata)
    failures = self._failures() - before
    terms = dict(self.reward.last_terms)
    return Rollouts(index, prompts, [res.output_ids for res in results],
                    [res.logprobs for res in results], [res.finish_reason for res in results],
                    texts, np.asarray(scores, np.float64), terms, seconds,
                    time.perf_counter() - t1, failures)

  def _failures(self) -> int:
    """Examples the rewards could not score so far (each term's errors, timeouts, sandbox
    violations, non-finite values)."""
    return sum(c["errors"] + c["timeouts"] + c["violations"] + c["nonfinite"]
               for c in self.reward.all_counts().values())

  def rollout_metrics(self, ro: Rollouts) -> dict[str, float]:
    """Reward mean / std (and per term), response length, truncation, generation speed."""
    lengths = np.asarray([len(o) for o in ro.output_ids], np.float64)
    out = {"reward_mean": float(ro.rewards.mean()), "reward_std": float(ro.rewards.std()),
           "response_length": float(lengths.mean()),
           "truncated": float(np.mean([f == "length" for f in ro.finish_reasons])),
           "rollout_tokens_per_s": float(lengths.sum() / max(ro.seconds, 1e-9)),
           "rollout_s": ro.seconds, "reward_s": ro.reward_seconds}
    if len(ro.terms) > 1:
      for name, values in ro.terms.items():
        out[f"reward/{name}"] = float(np.mean(values))
    out["reward_failures"] = float(ro.reward_failures)
    return out

  def rollout_metric_names(self) -> tuple[str, ...]:
    names = ["reward_mean", "reward_std", "response_length", "truncated",
             "rollout_tokens_per_s", "rollout_s", "reward_s", "reward_failures"]
    if len(self.reward_terms) > 1:
      names += [f"reward/{t.label}" for t in self.reward_terms]
    return tuple(names)

  # ----- evaluation: the greedy response's reward on held-out prompts
  def make_eval_step(self, mesh, rules):
    def evaluate(params, batch):
      ro = self.rollout(params, batch["example_index"][:, 0], 0, greedy=True, held_out=True)
      lengths = [len(o) for o in ro.output_ids]
      return {"reward": float(ro.rewards.sum()), "response_length": float(sum(lengths)),
              "prompts": float(len(ro.rewards))}
    return evaluate

  def eval_result(self, sums):
    n = max(sums.get("prompts", 0.0), 1.0)
    return {"eval/reward_mean": sums.get("reward", 0.0) / n,
            "eval/response_length": sums.get("response_length", 0.0) / n,
            "eval/prompts": sums.get("prompts", 0.0)}
