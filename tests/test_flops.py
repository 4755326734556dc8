"""`qwen2_jax.flops`: model FLOPs per token against hand counts, the chip table, and one number
shared by the AOT planner and the training logs."""

from __future__ import annotations

import jax
import pytest

from qwen2_jax import flops, presets
from qwen2_jax.cli import compile_cmd
from qwen2_jax.infer import targets as infer_targets

# qwen2-tiny: V 512, H 64, F 128, L 2, N 4 query heads, K 2 kv heads, D 16, untied head.
#   per layer: q_proj 64*64 + q_bias 64 + k_proj, v_proj 2 * (64*32 + 32) + o_proj 64*64 = 12416
#              MLP 3*64*128 = 24576, two norms 2*64 = 128                   -> 37120
#   P = 2 layers 74240 + final norm 64 + LM head 64*512 = 32768              -> 107072
#   (the [V, H] embedding is a lookup, not a matmul)
DENSE_P = 107072
# qwen2-moe-tiny: the same attention; E 8 experts of width 32, top-2, shared expert width 64.
#   per layer: attention 12416 + router 64*8 = 512 + 2 active experts 2*3*64*32 = 12288
#              + shared expert 3*64*64 = 12288 + shared gate 64 + norms 128  -> 37696
#   P = 2 * 37696 + 64 + 32768                                               -> 108224
MOE_P = 108224
LND = 2 * 4 * 16  # layers x query heads x head width


@pytest.mark.parametrize("preset,P", [("qwen2-tiny", DENSE_P), ("qwen2-moe-tiny", MOE_P)])
def test_flops_per_token_equal_hand_counts(preset, P):
  """Training 6P + 6LNDT (causal: half the square), prefill 2(P - VH) + 2VH/T + 2LNDT, decode
  2P + 4LNDS, for a dense and an MoE tiny config."""
  c = presets.get_preset(preset)
  head = 512 * 64
  assert flops.matmul_params(c) == P
  assert flops.train_flops_per_token(c, 128) == 6 * P + 6 * LND * 128
  assert flops.prefill_flops_per_token(c, 128) == 2 * (P - head) + 2 * head / 128 + 2 * LND * 128
  assert flops.decode_flops_per_token(c, 256) == 2 * P + 4 * LND * 256


def test_dpo_factor_adds_one_forward_of_the_reference():
  """A DPO step with the reference run in the step costs a third more than a training step."""
  assert flops.dpo_flops_factor(precomputed=True) == 1.0
  assert flops.dpo_flops_factor(precomputed=False) == pytest.approx(4 / 3)


def test_chip_table_matches_device_kinds():
  """Device kinds map to the spec sheet (longest name wins); unknown kinds give None; on CPU the
  peak is a measured matmul rate."""
  assert flops.peak_flops_per_device("TPU v5p chip") == 459e12
  assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
  assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
  assert flops.peak_flops_per_device("a new accelerator") is None
  assert flops.chip_for_device_kind("TPU v4").hbm_bytes == 32 * flops.GiB
  assert not flops.CHIPS["h100"].is_tpu and flops.CHIPS["v5e"].is_tpu
  if jax.devices()[0].platform == "cpu":
    assert flops.peak_flops_for_devices(jax.devices()) > 0


def test_planner_and_training_logs_count_the_same_flops():
  """`qwen2-jax compile`'s targets and the training loop's MFU use the same FLOPs per token."""
  c = presets.get_preset("qwen2-tiny")
  expected = 6 * DENSE_P + 6 * LND * 128
  targets = compile_cmd.compile_targets(new_tokens=64)
  assert targets["train"].flops_per_token(c, 128) == expected
  assert targets["sft"].flops_per_token(c, 128) == expected
  # What the training jobs log MFU with (`train.runner`, `train.dpo`: the same factor).
  assert flops.train_flops_per_token(c, 128) == expected
  assert targets["dpo"].flops_per_token(c, 128) == pytest.approx(4 / 3 * expected)
  assert targets["dpo_precomputed"].flops_per_token(c, 128) == expected
  assert targets["dpo"].tokens_per_step(4, 128) == 2 * 4 * 128  # a pair is two sequences
  assert targets["prefill"].flops_per_token(c, 128) == flops.prefill_flops_per_token(c, 128)
  assert targets["decode"].flops_per_token(c, 128) == flops.decode_flops_per_token(c, 192)
  assert infer_targets.generation_target("decode", 64).tokens_per_step(8, 128) == 8
