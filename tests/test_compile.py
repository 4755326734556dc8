"""`qwen2-jax compile` and `qwen2_jax.aot`: real TPU compiles (libtpu) of the tiny model on small
topologies, run on this CPU machine. Skipped only when libtpu is not installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest

from qwen2_jax import aot, flops, presets, sharding
from qwen2_jax.cli import compile_cmd
from qwen2_jax.train import targets as train_targets

TRAIN = train_targets.TARGETS["train"]

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'): no TPU compiler")


def test_topology_names_map_to_slice_shapes():
  """v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips; explicit shapes work."""
  cases = {"v5p-8": ((2, 2, 1), 4), "v5p-128": ((4, 4, 4), 64), "v5p-256": ((4, 4, 8), 128),
           "v4-32": ((2, 2, 4), 16), "v5e-8": ((2, 4), 8), "v5litepod-16": ((4, 4), 16),
           "v6e-256": ((16, 16), 256), "v6e-1": ((1, 1), 1), "v5p:16x16x24": ((16, 16, 24), 6144)}
  for name, (dims, chips) in cases.items():
    t = aot.parse_topology(name)
    assert (t.dims, t.num_chips) == (dims, chips), name
  assert aot.parse_topology("v5e-8", num_slices=2).num_chips == 16
  assert flops.CHIPS["v5p"].hbm_bytes == 95 * flops.GiB
  for bad in ("v7x-8", "v5p-7", "v5e:2x2x2", "tpu", "h100-8"):
    with pytest.raises(ValueError):
      aot.parse_topology(bad)


@needs_libtpu
def test_compile_command_json_report(capsys):
  """The CLI compiles the tiny train step for v5e:2x2 and reports memory, FLOPs, estimate."""
  code = compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "8",
                           "--seq-len", "128", "--remat", "full", "--json"])
  report = json.loads(capsys.readouterr().out)
  assert code == 0 and report["fits"] is True
  assert report["topology"]["chips"] == 4 and report["mesh"]["fsdp"] == 4
  mem = report["memory_per_device"]
  # The tiny program may need no HBM temporaries at all (libtpu reports 0 here).
  assert mem["argument_bytes"] > 0 and mem["temp_bytes"] >= 0
  assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                + mem["temp_bytes"] + mem["generated_code_bytes"])
  assert mem["alias_bytes"] > 0  # the state is donated
  flops = report["flops_per_device"]
  assert 0.8 < flops["xla"] / flops["analytic_model"] < 1.6  # remat recomputes the forward
  assert "not measured" in report["estimate"]["note"] and 0 < report["estimate"]["mfu"] < 1
  assert report["compile_seconds"] > 0


@needs_libtpu
def test_compile_reports_host_memory_of_offloaded_layer_inputs(capsys):
  """With a host-offloading remat policy the report gives the host memory the offloaded layer
  inputs take per device (at least one [batch/chips, seq, hidden] bf16 value per layer)
  outside the HBM total; without one it is 0."""
  base = ["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "8", "--seq-len", "128",
          "--remat", "full", "--no-cost", "--json"]
  assert compile_cmd.main(base) == 0
  assert json.loads(capsys.readouterr().out)["memory_per_device"]["host_temp_bytes"] == 0
  assert compile_cmd.main(base + ["--set", "model.remat_policy=offload_layer_input"]) == 0
  report = json.loads(capsys.readouterr().out)
  c = presets.get_preset("qwen2-tiny")
  layer_inputs = c.num_hidden_layers * (8 // 4) * 128 * c.hidden_size * 2
  assert report["memory_per_device"]["host_temp_bytes"] >= layer_inputs
  assert compile_cmd.main(base[:-1] + ["--set", "model.remat_policy=offload_layer_input"]) == 0
  assert "host memory per device (offloaded buffers" in capsys.readouterr().out


@needs_libtpu
def test_compile_command_text_report_multislice_tensor_parallel(capsys):
  """fsdp_tp on two v6e:2x2 slices (data 2 over DCN x fsdp 2 x tensor 2) compiles; the text
  report gives the mesh and whether it fits."""
  code = compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v6e:2x2", "--num-slices",
                           "2", "--batch", "4", "--seq-len", "64", "--mesh", "fsdp=2,tensor=2",
                           "--rules", "fsdp_tp", "--no-cost"])
  out = capsys.readouterr().out
  assert code == 0 and "FITS" in out and "8 chips" in out and "fsdp_tp" in out
  assert "data=2 fsdp=2 sequence=1 expert=1 tensor=2" in out


@needs_libtpu
def test_xla_flops_extrapolation_matches_an_unrolled_compile():
  """XLA counts a scan body once; the 1-/2-layer extrapolation equals an unrolled 4-layer
  compile's count (within 1%)."""
  config = presets.get_preset("qwen2-tiny", num_hidden_layers=4, dtype="bfloat16")
  topology = aot.parse_topology("v5e:2x2")
  mesh_config, rules = sharding.MeshConfig(), sharding.get_rules("fsdp")
  extrapolated = aot.xla_cost(config, topology, mesh_config, rules, 4, 64, target=TRAIN)
  unrolled = aot.compile_step(config.replace(scan_layers=False), topology, mesh_config, rules,
                              4, 64, target=TRAIN)
  flops, bytes_accessed = aot._cost(unrolled.compiled)  # pylint: disable=protected-access
  assert extrapolated["flops"] == pytest.approx(flops, rel=0.01)
  assert extrapolated["bytes_accessed"] == pytest.approx(bytes_accessed, rel=0.05)


@needs_libtpu
def test_batch_search_stops_at_the_memory_boundary():
  """On a chip with a small pretend HBM (room for about 3 batch multiples) the search returns a
  fitting batch whose next multiple was probed and does not fit; every probe is a multiple of
  the batch shards."""
  config = presets.get_preset("qwen2-tiny", dtype="bfloat16")
  real = aot.parse_topology("v5e:2x2")
  mesh_config, rules = sharding.MeshConfig(), sharding.get_rules("fsdp")
  m4, m8 = (aot.compile_step(config, real, mesh_config, rules, b, 128, target=TRAIN)
            .memory["total_bytes"] for b in (4, 8))
  small_chip = dataclasses.replace(real.chip, hbm_bytes=int(m4 + 2.5 * (m8 - m4)))
  topology = dataclasses.replace(real, chip=small_chip)
  best, probes = aot.search_batch(config, topology, mesh_config, rules, 128, target=TRAIN,
                                  hbm_margin=0.0, max_batch=64)
  assert best is not None and best.fits and best.batch_size >= 8
  assert all(p.batch_size % 4 == 0 for p in probes)
  assert any(p.batch_size == best.batch_size + 4 and not p.fits for p in probes)
  assert all(p.fits == (p.memory["total_bytes"] <= small_chip.hbm_bytes) for p in probes)


@needs_libtpu
def test_compile_generation_programs(capsys):
  """--target prefill / decode compile the generation engine's programs for TPU; the decode
  state (KV cache) is donated, and 256 more new-token slots add exactly their cache and output
  bytes to the arguments."""
  c = presets.get_preset("qwen2-tiny")
  reports = {}
  for target, new in (("prefill", 128), ("decode", 128), ("decode", 384)):
    code = compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "8",
                             "--seq-len", "128", "--target", target, "--new-tokens", str(new),
                             "--mesh", "fsdp=2,tensor=2", "--rules", "fsdp_tp", "--json"])
    reports[target, new] = json.loads(capsys.readouterr().out)
    assert code == 0 and reports[target, new]["fits"] is True, (target, new)
  prefill, decode, longer = reports["prefill", 128], reports["decode", 128], reports["decode", 384]
  assert prefill["target"] == "prefill" and prefill["tokens_per_step"] == 8 * 128
  assert decode["tokens_per_step"] == 8 and decode["cache_slots"] == 256
  assert prefill["model"]["remat_policy"] == "none"
  # k and v [L, B, S, K, D] bf16, batch over fsdp (2) and kv heads over tensor (2).
  slot_bytes = 2 * c.num_hidden_layers * 8 * c.num_key_value_heads * c.head_size * 2 // 4
  grow = (longer["memory_per_device"]["argument_bytes"]
          - decode["memory_per_device"]["argument_bytes"])
  table_bytes = 8 * (4 + 4) // 2  # per new slot: tokens i32 + logprobs f32 [B, N], rows over fsdp
  assert grow == 256 * (slot_bytes + table_bytes)
  assert decode["memory_per_device"]["alias_bytes"] >= 256 * slot_bytes  # cache updated in place
  for r in (prefill, decode):
    assert 0.5 < r["flops_per_device"]["xla"] / r["flops_per_device"]["analytic_model"] < 3


@needs_libtpu
def test_compile_sft_and_dpo_steps(capsys):
  """`--job sft|dpo|dpo_precomputed` compile the post-training steps of the tiny model for
  v5e:2x2; a DPO batch counts pairs (2 sequences each), and holding the reference params on
  the mesh (dpo) costs more argument memory than precomputed reference log-probs."""
  reports = {}
  for job in ("sft", "dpo", "dpo_precomputed"):
    code = compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "4",
                             "--seq-len", "64", "--job", job, "--no-cost", "--json"])
    reports[job] = json.loads(capsys.readouterr().out)
    assert code == 0 and reports[job]["fits"] and reports[job]["target"] == job
    assert reports[job]["memory_per_device"]["alias_bytes"] > 0  # the policy state is donated
  assert reports["sft"]["tokens_per_step"] == 4 * 64
  assert reports["dpo"]["tokens_per_step"] == reports["dpo_precomputed"]["tokens_per_step"] \
      == 2 * 4 * 64
  args = {job: r["memory_per_device"]["argument_bytes"] for job, r in reports.items()}
  assert args["dpo"] > args["dpo_precomputed"]


@needs_libtpu
def test_compile_grpo_update_with_reference_and_kv_pools(capsys):
  """`--target grpo` compiles the GRPO update for v5e:2x2 with the reference params and the
  rollout engine's KV pools as resident inputs: its argument memory exceeds the SFT step's by
  at least the reference params' and the pools' bytes per device."""
  reports = {}
  for job in ("sft", "grpo"):
    code = compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "4",
                             "--seq-len", "64", "--target", job, "--no-cost", "--json"])
    reports[job] = json.loads(capsys.readouterr().out)
    assert code == 0 and reports[job]["fits"] and reports[job]["target"] == job
  config = presets.get_preset("qwen2-tiny")
  params = sum(math.prod(s) for s in _param_shapes(config)) * 4 / 4  # f32 bytes / 4 chips
  pages = 4 * -(-65 // 16)
  pools = 2 * config.num_hidden_layers * pages * 16 * config.num_key_value_heads \
      * config.head_size * 2                                           # bf16 k and v, replicated
  extra = (reports["grpo"]["memory_per_device"]["argument_bytes"]
           - reports["sft"]["memory_per_device"]["argument_bytes"])
  assert extra >= 0.9 * params + pools, (extra, params, pools)
  assert "resident" in compile_cmd.format_report(reports["grpo"])


def _param_shapes(config):
  import jax  # pylint: disable=import-outside-toplevel
  from qwen2_jax import api  # pylint: disable=import-outside-toplevel
  return [x.shape for x in jax.tree.leaves(api.abstract_params(config))]


@needs_libtpu
def test_compile_serve_step_sizes_the_kv_pool(capsys):
  """--target serve compiles the continuous-batching engine's step for TPU (the Pallas ragged
  paged-attention kernel, pools donated, KV heads over the tensor axis) with the largest pool that
  fits (within 1%: temporaries there grow with the pool too), the pool's bytes = pages x the per-device page size; the
  requests it holds follow; --kv-cache-memory pins the pool instead."""
  from qwen2_jax.infer import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from qwen2_jax.infer import targets as infer_targets  # pylint: disable=import-outside-toplevel
  c = presets.get_preset("qwen2-tiny", dtype="bfloat16", param_dtype="bfloat16")
  base = ["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--batch", "8", "--seq-len", "100",
          "--new-tokens", "60", "--target", "serve", "--mesh", "fsdp=2,tensor=2", "--rules",
          "fsdp_tp", "--param-dtype", "bfloat16", "--max-num-batched-tokens", "64", "--json"]
  assert compile_cmd.main(base + ["--no-cost"]) == 0
  r = json.loads(capsys.readouterr().out)
  sv, mem = r["serve"], r["memory_per_device"]
  # One page of both pools on one device: L x 16 tokens x (K / 2 tensor shards) x D, bf16.
  per_page = 2 * c.num_hidden_layers * 16 * (c.num_key_value_heads // 2) * c.head_size * 2
  assert sv["bytes_per_page_per_device"] == per_page
  assert sv["pool_bytes_per_device"] == sv["num_pages"] * per_page
  budget = 0.95 * aot.parse_topology("v5e:2x2").chip.hbm_bytes
  assert r["fits"] and mem["total_bytes"] <= budget
  # The largest fit: a pool at most 1% larger was compiled and did not fit.
  assert any(not p["fits"] and p["num_pages"] <= 1.01 * sv["num_pages"] + 1
             for p in sv["sizing"])
  assert mem["alias_bytes"] >= sv["pool_bytes_per_device"]  # pools updated in place
  assert sv["pages_per_request"] == 10  # 100 + 60 - 1 cached tokens in pages of 16
  assert sv["requests_in_pool"] == sv["num_pages"] // 10 and sv["concurrent_requests"] == 8
  assert r["tokens_per_step"] == 64 and sv["table_width_pages"] == 16  # 256-token floor
  assert compile_cmd.main(base + ["--no-cost", "--kv-cache-memory", "0.25"]) == 0
  pinned = json.loads(capsys.readouterr().out)["serve"]
  assert pinned["num_pages"] == (1 << 28) // per_page and len(pinned["sizing"]) == 1
  # The TPU program runs the Pallas kernel, though this host's backend is the CPU.
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("fsdp=2,tensor=2"),
                            aot.topology_devices(aot.parse_topology("v5e:2x2")))
  target = infer_targets.serve_target(8, 60, 64, 16, 40)
  text = target.lower(c, mesh, sharding.get_rules("fsdp_tp"), 8, 100).as_text()
  assert "tpu_custom_call" in text
  assert engine_lib.table_width(159, 16, c.max_position_embeddings) == 16


@needs_libtpu
def test_compile_serve_rejects_batch_search():
  with pytest.raises(compile_cmd.CompileSettingError, match="--search-batch"):
    compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:2x2", "--search-batch",
                      "--target", "serve"])


@needs_libtpu
def test_compile_serve_matmul_precision(capsys):
  """--matmul-precision traces the serve step's float32 dots as Engine(matmul_precision=...)
  does (the TPU HLO carries the precision), puts 3 or 6 bf16 MXU passes into the compute
  estimate (XLA's FLOP count is the same for both), and shows in the engine settings. The
  estimate's bytes come from a pool of the step's own pages: they do not grow with the pool.
  The flag is refused for other targets and for a bfloat16 compute dtype."""
  from qwen2_jax.infer import targets as infer_targets  # pylint: disable=import-outside-toplevel
  base = ["--preset", "qwen2-tiny", "--topology", "v5e:1x1", "--batch", "4", "--seq-len", "40",
          "--new-tokens", "24", "--target", "serve", "--max-num-batched-tokens", "16",
          "--dtype", "float32"]
  reports = {}
  for precision, pool in (("high", "0.01"), ("highest", "0.01"), ("highest", "0.02")):
    assert compile_cmd.main(base + ["--matmul-precision", precision, "--kv-cache-memory", pool,
                                    "--json"]) == 0
    reports[precision, pool] = json.loads(capsys.readouterr().out)
  high, highest = reports["high", "0.01"], reports["highest", "0.01"]
  big = reports["highest", "0.02"]
  assert (high["mxu_passes"], highest["mxu_passes"]) == (3, 6)
  assert high["serve"]["matmul_precision"] == "high" == high["matmul_precision"]
  assert high["flops_per_device"]["xla"] == highest["flops_per_device"]["xla"] > 0
  assert highest["estimate"]["compute_s"] == pytest.approx(2 * high["estimate"]["compute_s"],
                                                           rel=1e-9)
  # Twice the pool, same cost pool (4 requests of 4 pages), same estimate.
  assert big["serve"]["num_pages"] > highest["serve"]["num_pages"] >= 16
  assert big["serve"]["cost_pool_pages"] == highest["serve"]["cost_pool_pages"] == 16
  assert big["bytes_accessed_per_device"]["xla"] == highest["bytes_accessed_per_device"]["xla"]
  assert (big["bytes_accessed_per_device"]["xla_scanned_program"]
          > highest["bytes_accessed_per_device"]["xla_scanned_program"])
  text = compile_cmd.format_report(high)
  assert "matmul_precision='high'" in text and "3 bf16 MXU passes" in text
  c = presets.get_preset("qwen2-tiny", dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string(""),
                            aot.topology_devices(aot.parse_topology("v5e:1x1")))
  hlo = {p: infer_targets.serve_target(4, 24, 16, 16, 16, p).lower(
      c, mesh, sharding.get_rules("fsdp"), 4, 40).as_text() for p in (None, "high", "highest")}
  assert "HIGHEST" in hlo["highest"] and "HIGH" in hlo["high"] and "HIGHEST" not in hlo["high"]
  assert "HIGH" not in hlo[None]
  with pytest.raises(compile_cmd.CompileSettingError, match="--matmul-precision: only with"):
    compile_cmd.main(["--preset", "qwen2-tiny", "--topology", "v5e:1x1", "--batch", "4",
                      "--target", "decode", "--dtype", "float32", "--matmul-precision", "high"])
  with pytest.raises(compile_cmd.CompileSettingError, match="compute dtype is bfloat16"):
    compile_cmd.main(base[:-2] + ["--matmul-precision", "high"])
  with pytest.raises(ValueError, match="matmul_precision"):
    infer_targets.serve_target(4, 24, 16, 16, 16, "fastest")
