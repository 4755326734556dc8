"""What the post-training jobs (SFT, DPO) share on `train.runner`: chat data and its settings.

Data are JSONL chat files read whole up front (`train.chat_data`); the run length defaults to
`data.num_epochs` passes over them, and with `auto_decay` (default here) the learning rate
decays from `optim.learning_rate` to `optim.min_learning_rate` over exactly the run
(decay_steps = steps - warmup_steps). Weights usually come from `init_from` (an HF directory or
an Orbax params directory, `qwen2-jax convert`): the model config is then read from there unless
`model` names a preset or every field, and the tokenizer defaults to the one in `init_from`; its
files are copied into the HF export. Evaluation (`eval_every`) reads the examples held out by
`data.eval_every_nth_example`, which are never trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qwen2_jax.train import chat_data, runner
from qwen2_jax.typed_config import Bool, ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatRunSettings(runner.RunSettings):
  """The run settings of a job on chat data (a base of `SFTConfig` and `DPOConfig`)."""
  data: chat_data.ChatDataConfig
  auto_decay: Bool = True              # decay_steps = steps - warmup_steps

  def __post_init__(self):
    super().__post_init__()
    if self.eval_every and not self.data.eval_every_nth_example:
      raise ConfigError(f"{type(self).__name__}.eval_every: {self.eval_every} needs "
                        f"data.eval_every_nth_example > 0 (the held-out examples)")


class ChatJob(runner.Job):
  """A job on a `chat_data` dataset; subclasses set `dataset_class`."""
  dataset_class: type = chat_data.SFTDataset

  examples_name = "examples"           # what the data summary calls them

  def make_dataset(self, tokenizer):
    return self.dataset_class(self.cfg.data, tokenizer)

  def dropped_note(self, n: int) -> str:
    return (f"{self.name}: dropped {n} examples longer than seq_len={self.cfg.data.seq_len} "
            f"(too_long: drop)")

  def open_data(self, tokenizer) -> runner.Data:
    dataset = self.dataset = self.make_dataset(tokenizer)
    summary = {self.examples_name: len(dataset.examples), "dropped_too_long": dataset.num_dropped,
               "batches_available": dataset.total_batches}
    held_out = None
    if dataset.held_out is not None:
      summary["held_out"] = len(dataset.held_out.examples)
      held_out = lambda: dataset.held_out.iterator(jax.process_index(), jax.process_count())
    note = self.dropped_note(dataset.num_dropped) if dataset.num_dropped else None
    return runner.Data(iterator=dataset.iterator(jax.process_index(), jax.process_count()),
                       total_batches=dataset.total_batches, held_out=held_out,
                       summary=summary, note=note)

  def host_batch(self, batch: dict[str, Any], held_out: bool = False) -> dict[str, Any]:
    batch.pop("example_index")
    return batch
