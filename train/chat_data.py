"""Chat data for post-training: SFT conversations and DPO preference pairs, as resumable batches.

Files are JSONL, one example per line (blank lines skipped):

  SFT  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
  DPO  {"prompt": "..."} or {"messages": [...prompt turns...]}, plus
       {"chosen": R, "rejected": R} with R a string, {"role": "assistant", "content": "..."}
       or a list holding one such message

Every line is read, validated and tokenised with ChatML (`qwen2_jax.tokenizer`) once, when the
dataset is built, so a bad line stops the run before anything is compiled, with an error naming
`file:line`. SFT trains on assistant tokens only (content and its `<|im_end|>`); DPO scores the
final response only (content and `<|im_end|>`), never the prompt.

Rows. An example of n ids becomes inputs ids[:-1], targets ids[1:], loss weights mask[1:]
(n - 1 positions). SFT packs examples greedily in epoch order into rows of `seq_len`
(`segment_ids` 1, 2, ... per conversation, 0 = padding; `positions` restart at 0), never
splitting a conversation; DPO pads each sequence to its own row (chosen of pair i in row 2i,
rejected in row 2i + 1). An example longer than `seq_len` is never truncated: `too_long: drop`
(default) skips it and counts it (`num_dropped`, reported in the run summary), `too_long:
error` raises naming the line.

Held out. With `eval_every_nth_example: n`, the n-th, 2n-th, ... example read (file order,
counted before too-long examples are dropped) goes to `dataset.held_out` instead of training:
one unshuffled epoch, batched and padded like training, for evaluation only.

Batches. Each epoch has its own shuffle (seed, epoch); the final batch of an epoch is completed
with all-padding rows (zero loss weight), so every example is seen once per epoch. The batch
plan is computed identically on every process (all read every file) and process p takes rows
[p B/P, (p+1) B/P) of each global batch. The iterator state is just {epoch, batch}: restoring it
reproduces the remaining stream exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from qwen2_jax.tokenizer import DEFAULT_SYSTEM, encode_chat_with_mask
from qwen2_jax.train.data import glob_files

TOO_LONG_MODES = ("drop", "error")
PROMPT_ROLES = ("system", "user", "tool")


class ChatDataError(ValueError):
  """A chat data setting or a line of a data file is invalid; the message names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatDataConfig:
  """Everything that determines the example stream (and so must match on resume)."""
  paths: tuple[str, ...]                  # JSONL files or glob patterns (`~`, `$VARS` expanded)
  seq_len: int                            # tokens per row
  batch_size: int                         # global: SFT rows / DPO pairs per optimizer step
  seed: int = 0                           # shuffle seed (each epoch reshuffles)
  num_epochs: int = 1
  default_system: str | None = DEFAULT_SYSTEM  # ChatML default system prompt; None: none
  too_long: str = "drop"                  # example longer than seq_len: "drop" (counted) | "error"
  pack: bool = True                       # SFT: pack several conversations per row
  eval_every_nth_example: int = 0         # >0: hold out every n-th example (file order) for eval

  def __post_init__(self):
    object.__setattr__(self, "paths", tuple([self.paths] if isinstance(self.paths, str)
                                            else self.paths))
    if not self.paths:
      raise ChatDataError("ChatDataConfig.paths: at least one file is required")
    for name in ("seq_len", "batch_size", "num_epochs"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ChatDataError(f"ChatDataConfig.{name}: must be a positive integer, "
                            f"got {getattr(self, name)!r}")
    if not isinstance(self.eval_every_nth_example, int) or self.eval_every_nth_example < 0:
      raise ChatDataError(f"ChatDataConfig.eval_every_nth_example: must be an integer >= 0, "
                          f"got {self.eval_every_nth_example!r}")
    if self.too_long not in TOO_LONG_MODES:
      raise ChatDataError(f"ChatDataConfig.too_long: {self.too_long!r} is not one of "
                          f"{TOO_LONG_MODES}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ChatDataConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ChatDataError(f"unknown ChatDataConfig field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)

  def files(self) -> list[str]:
    return glob_files(self.paths, ChatDataError, "ChatDataConfig.paths")


def read_jsonl(files: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
  """(`file:line`, object) for every non-blank line; malformed lines raise naming file:line."""
  for path in files:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{number}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ChatDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
          raise ChatDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


# ----------------------------------------------------------------------------- encoding

def _messages(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
  messages = record.get(key)
  if not isinstance(messages, list) or not messages:
    raise ChatDataError(f"{where}: {key!r} must be a non-empty list of "
                        f"{{'role': ..., 'content': ...}} messages")
  return messages


def _encode(tokenizer, messages, where: str, default_system) -> tuple[list[int], list[int]]:
  try:
    return encode_chat_with_mask(tokenizer, messages, default_system=default_system)
  except ValueError as e:
    raise ChatDataError(f"{where}: {e}") from None


def encode_conversation(tokenizer, record: Mapping[str, Any], where: str, *,
                        default_system: str | None = DEFAULT_SYSTEM
                        ) -> tuple[np.ndarray, np.ndarray]:
  """SFT line -> (ids [n] int32, loss mask [n] f32: 1 on assistant content and <|im_end|>)."""
  messages = _messages(record, "messages", where)
  if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
    raise ChatDataError(f"{where}: the conversation has no assistant turn (nothing to train on)")
  ids, mask = _encode(tokenizer, messages, where, default_system)
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def _response(record: Mapping[str, Any], key: str, where: str) -> str:
  value = record.get(key)
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, Mapping):
    if value.get("role", "assistant") != "assistant":
      raise ChatDataError(f"{where}: {key!r} must be an assistant message, got role "
                          f"{value.get('role')!r}")
    value = value.get("content")
  if value is None:
    raise ChatDataError(f"{where}: missing {key!r} response")
  if not isinstance(value, str):
    raise ChatDataError(f"{where}: {key!r} must be a string, an assistant message or a list "
                        f"of one assistant message")
  return value


def encode_preference(tokenizer, record: Mapping[str, Any], where: str, *,
                      default_system: str | None = DEFAULT_SYSTEM
                      ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """DPO line -> ((chosen ids, mask), (rejected ids, mask)); masks are 1 on the response's
  content and its <|im_end|> only (the prompt, earlier assistant turns included, is 0)."""
  if ("prompt" in record) == ("messages" in record):
    raise ChatDataError(f"{where}: give exactly one of 'prompt' (a string) or 'messages'")
  if "prompt" in record:
    if not isinstance(record["prompt"], str):
      raise ChatDataError(f"{where}: 'prompt' must be a string")
    prompt = [{"role": "user", "content": record["prompt"]}]
  else:
    prompt = _messages(record, "messages", where)
    last = prompt[-1].get("role") if isinstance(prompt[-1], Mapping) else None
    if last not in PROMPT_ROLES:
      raise ChatDataError(f"{where}: the prompt's last message must be one of {PROMPT_ROLES} "
                          f"(the responses are the assistant's turn), got {last!r}")
  chosen, rejected = _response(record, "chosen", where), _response(record, "rejected", where)
  if chosen == rejected:
    raise ChatDataError(f"{where}: 'chosen' and 'rejected' are identical")
  prompt_ids, _ = _encode(tokenizer, prompt, where, default_system)
  out = []
  for text in (chosen, rejected):
    ids, mask = _encode(tokenizer, [{"role": "assistant", "content": text}], where, None)
    out.append((np.asarray(prompt_ids + ids, np.int32),
                np.asarray([0] * len(prompt_ids) + mask, np.float32)))
  return out[0], out[1]


# ----------------------------------------------------------------------------- rows and batches

def pack_greedy(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
  """Examples in `order` into rows of at most `seq_len` positions; a row is closed when the
  next example does not fit (no example is split or reordered)."""
  rows, current, used = [], [], 0
  for i in order:
    if current and used + lengths[i] > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += lengths[i]
  if current:
    rows.append(current)
  return rows


def _empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  z = lambda dtype: np.zeros((n, seq_len), dtype)
  return {"input_ids": z(np.int32), "targets": z(np.int32), "loss_mask": z(np.float32),
          "positions": z(np.int32), "segment_ids": z(np.int32)}


class _EpochDataset:
  """Shared batching: `_epoch_rows(epoch)` lists each row's examples; `_fill` writes a row.

  `held_out` is a dataset of the same kind over the examples held out for evaluation
  (`eval_every_nth_example`; None when none are): one epoch in file order, never shuffled.
  """

  config: ChatDataConfig
  examples: list[Any]
  shuffle = True
  held_out: "_EpochDataset | None" = None

  def __init__(self):
    self._plans: dict[int, list[list[int]]] = {}

  def _is_held_out(self, k: int) -> bool:
    """Whether the k-th example read (0-based, file order, before dropping) is held out."""
    n = self.config.eval_every_nth_example
    return n > 0 and k % n == n - 1

  def _set_examples(self, examples: list[Any], held_out: list[Any], what: str) -> None:
    if not examples:
      raise ChatDataError(f"no usable {what} in {list(self.config.paths)} ({self.num_dropped} "
                          f"longer than seq_len={self.config.seq_len}, {len(held_out)} held out)")
    if self.config.eval_every_nth_example and not held_out:
      raise ChatDataError(f"ChatDataConfig.eval_every_nth_example="
                          f"{self.config.eval_every_nth_example} holds out none of the "
                          f"{len(examples)} {what}")
    self.examples = examples
    self._index_examples()
    if held_out:
      ev = copy.copy(self)
      ev.config = dataclasses.replace(self.config, num_epochs=1)
      ev.shuffle, ev.held_out, ev._plans, ev.examples = False, None, {}, held_out
      ev._index_examples()
      self.held_out = ev

  def _index_examples(self) -> None:
    """Derived per-example data (SFT: lengths), after `examples` is set."""

  def _epoch_rows(self, epoch: int) -> list[list[int]]:
    raise NotImplementedError

  def _rows_per_batch(self) -> int:
    return self.config.batch_size

  def plan(self, epoch: int) -> list[list[int]]:
    if epoch not in self._plans:
      self._plans = {epoch: self._epoch_rows(epoch)}  # keep one epoch's plan
    return self._plans[epoch]

  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.examples))
    return np.random.default_rng([self.config.seed, epoch]).permutation(len(self.examples))

  def batches_in_epoch(self, epoch: int) -> int:
    return -(-len(self.plan(epoch)) // self._rows_per_batch())

  @property
  def total_batches(self) -> int:
    return sum(self.batches_in_epoch(e) for e in range(self.config.num_epochs))

  def rows_batch(self, rows: Sequence[Sequence[int]], process_index: int = 0,
                 process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's share of a global batch made of `rows` (padded to full size)."""
    n = self._rows_per_batch()
    if n % process_count:
      raise ChatDataError(f"batch of {n} rows is not divisible by {process_count} processes")
    local = n // process_count
    mine = list(rows[process_index * local:(process_index + 1) * local])
    out = _empty_rows(local, self.config.seq_len)
    out["example_index"] = np.full((local, 1), -1, np.int32)
    for r, members in enumerate(mine):
      self._fill(out, r, members)
    return out

  def batch(self, epoch: int, b: int, process_index: int = 0, process_count: int = 1):
    n = self._rows_per_batch()
    return self.rows_batch(self.plan(epoch)[b * n:(b + 1) * n], process_index, process_count)

  def iterator(self, process_index: int = 0, process_count: int = 1) -> "EpochIterator":
    return EpochIterator(self, process_index, process_count)


class EpochIterator:
  """Batches of every epoch in order; state {epoch, batch} (JSON-able, exact on restore)."""

  def __init__(self, dataset: _EpochDataset, process_index: int, process_count: int):
    self.dataset, self.process_index, self.process_count = dataset, process_index, process_count
    self.epoch, self.next_batch = 0, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while self.epoch < self.dataset.config.num_epochs and \
        self.next_batch >= self.dataset.batches_in_epoch(self.epoch):
      self.epoch, self.next_batch = self.epoch + 1, 0
    if self.epoch >= self.dataset.config.num_epochs:
      raise StopIteration
    out = self.dataset.batch(self.epoch, self.next_batch, self.process_index, self.process_count)
    self.next_batch += 1
    return out

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.next_batch}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.epoch, self.next_batch = int(state["epoch"]), int(state["batch"])


def _check_length(n: int, config: ChatDataConfig, where: str) -> bool:
  """Whether an example of n positions fits; raises under too_long: error."""
  if n <= config.seq_len:
    return True
  if config.too_long == "error":
    raise ChatDataError(f"{where}: {n + 1} tokens do not fit seq_len={config.seq_len} "
                        f"(+1 for the shifted targets); raise seq_len or set too_long: drop")
  return False


class SFTDataset(_EpochDataset):
  """Tokenised conversations (inputs, targets, weights per example) and their packed batches."""

  def __init__(self, config: ChatDataConfig, tokenizer):
    super().__init__()
    self.config = config
    examples, held_out = [], []  # (inputs, targets, weights) per conversation
    self.num_dropped = 0
    for k, (where, record) in enumerate(read_jsonl(config.files())):
      ids, mask = encode_conversation(tokenizer, record, where,
                                      default_system=config.default_system)
      if not _check_length(len(ids) - 1, config, where):
        self.num_dropped += 1
        continue
      (held_out if self._is_held_out(k) else examples).append((ids[:-1], ids[1:], mask[1:]))
    self._set_examples(examples, held_out, "conversations")

  def _index_examples(self):
    self.lengths = [len(e[0]) for e in self.examples]
    self.num_trained_tokens = int(sum(e[2].sum() for e in self.examples))

  def _epoch_rows(self, epoch):
    order = self.order(epoch)
    if not self.config.pack:
      return [[int(i)] for i in order]
    return pack_greedy(self.lengths, order, self.config.seq_len)

  def _fill(self, out, r, members):
    start = 0
    for segment, i in enumerate(members, 1):
      inputs, targets, weights = self.examples[i]
      end = start + len(inputs)
      out["input_ids"][r, start:end] = inputs
      out["targets"][r, start:end] = targets
      out["loss_mask"][r, start:end] = weights
      out["positions"][r, start:end] = np.arange(len(inputs))
      out["segment_ids"][r, start:end] = segment
      start = end
    out["example_index"][r, 0] = members[0]


class PreferenceDataset(_EpochDataset):
  """Tokenised (chosen, rejected) pairs; a batch of B pairs is 2B rows (chosen at even rows)."""

  def __init__(self, config: ChatDataConfig, tokenizer):
    super().__init__()
    self.config = config
    examples, held_out = [], []  # ((inputs, targets, weights) chosen, ... rejected) per pair
    self.num_dropped = 0
    for k, (where, record) in enumerate(read_jsonl(config.files())):
      pair = encode_preference(tokenizer, record, where, default_system=config.default_system)
      if not all(_check_length(len(ids) - 1, config, where) for ids, _ in pair):
        self.num_dropped += 1
        continue
      pair = tuple((ids[:-1], ids[1:], mask[1:]) for ids, mask in pair)
      (held_out if self._is_held_out(k) else examples).append(pair)
    self._set_examples(examples, held_out, "preference pairs")

  def _rows_per_batch(self):
    return 2 * self.config.batch_size

  def _epoch_rows(self, epoch):
    return [[int(i), side] for i in self.order(epoch) for side in (0, 1)]

  def ordered_rows(self) -> list[list[int]]:
    """Every pair once in file order (for precomputing reference log-probs)."""
    return [[i, side] for i in range(len(self.examples)) for side in (0, 1)]

  def _fill(self, out, r, members):
    i, side = members
    inputs, targets, weights = self.examples[i][side]
    n = len(inputs)
    out["input_ids"][r, :n] = inputs
    out["targets"][r, :n] = targets
    out["loss_mask"][r, :n] = weights
    out["positions"][r, :n] = np.arange(n)
    out["segment_ids"][r, :n] = 1
    out["example_index"][r, 0] = i
