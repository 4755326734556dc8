"""Ahead-of-time TPU planning: compile a step for a named TPU topology on any machine.

With `libtpu` installed (`pip install "jax[tpu]"`), the real TPU compiler runs on a CPU host for
a described topology ("v5p-128", "v6e:16x16"). Every input is a sharded `jax.ShapeDtypeStruct`,
so nothing is allocated: the 72B training step compiles on a laptop. From the compiled program:

  memory   per-device argument / output / temporary bytes (`compiled.memory_analysis()`),
           total = arguments + outputs - donated aliases + temporaries, vs the chip's HBM
  FLOPs    XLA's `cost_analysis()` next to the analytic model FLOPs (`qwen2_jax.flops`)
  estimate a roofline step time max(compute, HBM traffic, collectives) and the MFU it implies:
           ESTIMATES from peak numbers (`qwen2_jax.flops.CHIPS`), never measured

XLA's cost analysis counts a while-loop body once, and the layer scan is a while loop; so the
reported XLA FLOPs / bytes come from two extra unrolled compiles with 1 and 2 layers, extrapolated
linearly to L layers (cost(L) = a + b * L). Loops the TPU compiler itself creates (collective
matmuls over FSDP shards) are still counted once, so XLA's figure can be BELOW the analytic one
on FSDP meshes; the roofline uses the larger of the two.

What is compiled is a `Target`: a function (config, mesh, rules, batch, seq_len) ->
`jax.stages.Lowered` plus its analytic FLOPs per token. The programs' owners define them
(`qwen2_jax.train.targets`: train, sft, dpo, dpo_precomputed; `qwen2_jax.infer.targets`: prefill,
decode) and `qwen2-jax compile` assembles the registry; this module imports neither.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

from qwen2_jax import api, sharding
from qwen2_jax.config import Qwen2Config, num_params
from qwen2_jax.flops import CHIPS, ChipSpec

_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice shape (chips per axis), optionally repeated over DCN as several slices."""
  chip: ChipSpec
  dims: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.dims)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def name(self) -> str:
    """The Cloud accelerator-type name (v4/v5p count TensorCores, v5e/v6e count chips)."""
    n = self.chips_per_slice * (2 if self.chip.torus_dims == 3 else 1)
    slices = f" x{self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.chip.generation}-{n} ({self.chip.generation}:{'x'.join(map(str, self.dims))})" \
        + slices


def _default_dims(num_chips: int, ndim: int) -> tuple[int, ...]:
  """The usual slice shape for a chip count: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (3D) or
  1x1, 2x2, 2x4, 4x4, 4x8, ... (2D); power-of-two counts only (else give the shape)."""
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(f"{num_chips} chips: give the shape explicitly (e.g. 'v5p:16x16x24')")
  dims = [1] * ndim
  if ndim == 3 and num_chips >= 4:
    dims = [2, 2, 1]
  while math.prod(dims) < num_chips:
    i = max(j for j in range(ndim) if dims[j] == min(dims))
    dims[i] *= 2
  if math.prod(dims) != num_chips:
    raise ValueError(f"{num_chips} chips do not form a {ndim}D slice")
  return tuple(dims)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-128' (64 chips: v4/v5p names count TensorCores), 'v5e-8', 'v6e-256', or an explicit
  shape 'v5p:4x4x4', 'v5e:4x4', 'v6e:16x16' (chips per axis)."""
  m = re.fullmatch(r"\s*([a-z0-9]+?)(?:[-:])(\d+(?:x\d+)*)\s*", name.lower())
  if not m:
    raise ValueError(f"topology {name!r}: expected e.g. 'v5p-128' or 'v5p:4x4x4'")
  gen = _ALIASES.get(m.group(1), m.group(1))
  tpus = sorted(g for g, chip in CHIPS.items() if chip.is_tpu)
  if gen not in tpus:
    raise ValueError(f"topology {name!r}: unknown TPU generation {m.group(1)!r}; known: {tpus}")
  chip = CHIPS[gen]
  if "x" in m.group(2) or ":" in name:
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if len(dims) != chip.torus_dims:
      raise ValueError(f"topology {name!r}: {gen} slices are {chip.torus_dims}D")
  else:
    count = int(m.group(2))
    if chip.torus_dims == 3:
      if count % 2:
        raise ValueError(f"topology {name!r}: {gen} names count TensorCores (2 per chip)")
      count //= 2
    dims = _default_dims(count, chip.torus_dims)
  return Topology(chip, dims, num_slices)


def topology_devices(topology: Topology) -> list[Any]:
  """The (compile-only) devices of the topology, from libtpu's topology description."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's host probing
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only use never claims a TPU, so several planner processes may share libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  dims3 = tuple(topology.dims) + (1,) * (3 - len(topology.dims))
  if topology.chips_per_slice == 8 and topology.chip.torus_dims == 2:
    per_host = dims3  # v5e-8 / v6e-8: one host with 8 chips
  else:
    per_host = tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1)))
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{topology.chip.generation}:"
      f"{'x'.join(map(str, topology.dims))}", chip_config_name=topology.chip.chip_config,
      chips_per_host_bounds=per_host, num_slices=topology.num_slices)
  return list(desc.devices)


# ------------------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
  """What `compile` builds: (config, mesh, rules, B, T) -> `jax.stages.Lowered`, its analytic
  FLOPs per token and tokens per step (for the roofline), and whether it is a training step."""
  name: str
  lower: Callable[..., Any]
  flops_per_token: Callable[[Qwen2Config, int], float]
  tokens_per_step: Callable[[int, int], int] = lambda batch, seq_len: batch * seq_len
  training: bool = True
  # The precision `lower` traces float32 dots under (jax.default_matmul_precision); None: the
  # default, which is one bfloat16 pass on TPU.
  matmul_precision: str | None = None


# TPU MXU passes per float32 dot, by lax.Precision name: DEFAULT rounds both operands to bfloat16
# (one pass), HIGH splits each into two bfloat16 terms and multiplies three of the pairs
# (bf16_3x), HIGHEST uses six passes (bf16_6x). Dots on bfloat16 inputs take one pass in any mode.
MXU_PASSES = {None: 1, "default": 1, "high": 3, "highest": 6}


def mxu_passes(config: Qwen2Config, matmul_precision: str | None) -> int:
  """MXU passes per matmul for `config`'s compute dtype under `matmul_precision`."""
  return MXU_PASSES[matmul_precision] if config.dtype == "float32" else 1


# ------------------------------------------------------------------------------------- compile

def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and \
      "memory" in text


@dataclasses.dataclass
class Compiled:
  """One AOT compile: the memory it needs per device, or why it does not fit."""
  batch_size: int
  compile_seconds: float
  fits: bool
  memory: dict[str, int] | None = None   # per device; None when the compiler ran out of HBM
  error: str | None = None
  compiled: Any = dataclasses.field(default=None, repr=False)


def compile_step(config: Qwen2Config, topology: Topology, mesh_config: sharding.MeshConfig,
                 rules: sharding.Rules, batch_size: int, seq_len: int, *, target: Target,
                 hbm_margin: float = 0.05, devices=None) -> Compiled:
  """Compiles `target` for the topology; fits iff total bytes <= (1 - hbm_margin) * HBM."""
  devices = topology_devices(topology) if devices is None else devices
  mesh = sharding.make_mesh(mesh_config, devices)
  start = time.perf_counter()
  try:
    compiled = target.lower(config, mesh, rules, batch_size, seq_len).compile()
  except Exception as e:  # pylint: disable=broad-except
    if not _is_oom(e):
      raise
    first = str(e).strip().splitlines()[0][:300]
    return Compiled(batch_size, time.perf_counter() - start, False, error=first)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  memory = {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes),
            # host memory the step's offloaded buffers take per device (not part of the total,
            # which is HBM); nonzero only with a host-offloading remat policy
            "host_temp_bytes": int(m.host_temp_size_in_bytes)}
  memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                           - memory["alias_bytes"] + memory["temp_bytes"]
                           + memory["generated_code_bytes"])
  fits = memory["total_bytes"] <= (1 - hbm_margin) * topology.chip.hbm_bytes
  return Compiled(batch_size, seconds, fits, memory, compiled=compiled)


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def xla_cost(config: Qwen2Config, topology: Topology, mesh_config, rules, batch_size: int,
             seq_len: int, *, target: Target, devices=None) -> dict[str, float]:
  """XLA FLOPs and bytes accessed per device for all L layers, from unrolled 1- and 2-layer
  compiles: cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1))."""
  devices = topology_devices(topology) if devices is None else devices
  mesh = sharding.make_mesh(mesh_config, devices)
  costs = []
  for layers in (1, 2):
    small = config.replace(num_hidden_layers=layers, scan_layers=False,
                           max_window_layers=min(config.max_window_layers, layers),
                           mlp_only_layers=tuple(i for i in config.mlp_only_layers if i < layers))
    costs.append(_cost(target.lower(small, mesh, rules, batch_size, seq_len).compile()))
  (f1, b1), (f2, b2) = costs
  L = config.num_hidden_layers
  return {"flops": f1 + (L - 1) * (f2 - f1), "bytes_accessed": b1 + (L - 1) * (b2 - b1)}


def roofline(config: Qwen2Config, topology: Topology, mesh_shape: dict[str, int],
             rules: sharding.Rules, tokens: int, xla: dict[str, float],
             flops_per_token: float, *, training: bool = True,
             passes: int = 1) -> dict[str, float]:
  """Step-time ESTIMATE: max of compute, HBM traffic and collective time per device.

  compute = max(XLA FLOPs, analytic model FLOPs) x passes / peak bf16 FLOP/s: XLA also counts a
  compiler-generated loop's body once (the collective matmuls that overlap FSDP all-gathers
  with matmuls are such loops), so its count can fall below the model's. `passes`: MXU passes
  per float32 dot under a higher precision (`MXU_PASSES`; XLA's count does not change with it).
  Every FLOP is multiplied, also those of a Pallas kernel whose dots may not follow the default
  precision (attention), so it can overestimate. memory = XLA bytes accessed / HBM bandwidth.
  collectives (rough): FSDP all-gathers params twice (forward, backward) in the compute dtype and
  reduce-scatters f32 grads; tensor parallelism all-reduces the [B, T, H] activations 4 times
  per layer. Generation (`training=False`): one all-gather, no grads, 2 all-reduces per layer.
  """
  chip = topology.chip
  table = dict(rules)
  def degree(logical):
    return math.prod(mesh_shape[a] for a in table.get(logical, ()) if a in mesh_shape)
  fsdp, tp = degree("embed"), degree("mlp")
  itemsize = 2 if config.dtype == "bfloat16" else 4
  params = num_params(config) / tp
  fsdp_bytes = params * ((2 * itemsize + 4) if training else itemsize) * (fsdp - 1) / fsdp
  tokens_per_group = tokens / max(1, topology.num_chips // tp)
  tp_bytes = ((4 if training else 2) * config.num_hidden_layers * tokens_per_group
              * config.hidden_size * itemsize * 2 * (tp - 1) / tp)
  model_flops = flops_per_token * tokens
  t_compute = (max(xla["flops"], model_flops / topology.num_chips) * passes
               / chip.peak_bf16_flops)
  t_memory = xla["bytes_accessed"] / chip.hbm_bandwidth
  t_comm = (fsdp_bytes + tp_bytes) / chip.ici_bandwidth
  step = max(t_compute, t_memory, t_comm)
  return {"compute_s": t_compute, "hbm_s": t_memory, "collectives_s": t_comm, "step_s": step,
          "bound": ("compute", "hbm", "collectives")[[t_compute, t_memory, t_comm].index(step)],
          "mfu": model_flops / (step * chip.peak_bf16_flops * topology.num_chips),
          "tokens_per_s": tokens / step}


# ------------------------------------------------------------------------------------ planning

def plan(config: Qwen2Config, topology: Topology, mesh_config: sharding.MeshConfig,
         rules: sharding.Rules, batch_size: int, seq_len: int, *, target: Target,
         rules_name: str = "custom", hbm_margin: float = 0.05, with_cost: bool = True,
         compiled: Compiled | None = None, cost_target: Target | None = None) -> dict[str, Any]:
  """The full report of one configuration (see the module docstring); JSON-serialisable.
  `cost_target` (default `target`) is what the FLOPs and bytes of the estimate are taken from."""
  devices = topology_devices(topology)
  mesh_shape = mesh_config.shape(len(devices))
  if compiled is None:
    compiled = compile_step(config, topology, mesh_config, rules, batch_size, seq_len,
                            target=target, hbm_margin=hbm_margin, devices=devices)
  tokens = target.tokens_per_step(batch_size, seq_len)
  per_token = target.flops_per_token(config, seq_len)
  report: dict[str, Any] = {
      "target": target.name,
      "model": {"params": num_params(config), "layers": config.num_hidden_layers,
                "param_dtype": config.param_dtype, "dtype": config.dtype,
                "remat_policy": config.remat_policy, "scan_layers": config.scan_layers,
                "attention_impl": config.attention_impl,
                "loss_chunk_size": config.loss_chunk_size,
                "dual_chunk_attention": None if config.dual_chunk_attention_config is None
                else dict(config.dual_chunk_attention_config)},
      "topology": {"name": topology.name, "generation": topology.chip.generation,
                   "chips": topology.num_chips, "num_slices": topology.num_slices,
                   "hbm_bytes_per_chip": topology.chip.hbm_bytes,
                   "peak_bf16_flops_per_chip": topology.chip.peak_bf16_flops},
      "mesh": mesh_shape, "rules": rules_name,
      "matmul_precision": target.matmul_precision,
      "mxu_passes": mxu_passes(config, target.matmul_precision),
      "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": tokens,
      "compile_seconds": round(compiled.compile_seconds, 2),
      "hbm_margin": hbm_margin, "fits": compiled.fits,
      "memory_per_device": compiled.memory, "error": compiled.error,
      "flops_per_device": {"analytic_model": per_token * tokens / topology.num_chips},
      "replicated_params": [
          {"param": name, "bytes": n} for name, n in sharding.replicated_params(
              api.abstract_params(config),
              sharding.param_shardings(config, sharding.make_mesh(mesh_config, devices), rules))],
  }
  if with_cost and compiled.memory is not None:
    scan_flops, scan_bytes = _cost(compiled.compiled)
    xla = xla_cost(config, topology, mesh_config, rules, batch_size, seq_len,
                   target=target if cost_target is None else cost_target, devices=devices)
    report["flops_per_device"].update(xla=xla["flops"], xla_scanned_program=scan_flops)
    report["bytes_accessed_per_device"] = {"xla": xla["bytes_accessed"],
                                           "xla_scanned_program": scan_bytes}
    report["estimate"] = {"note": "ESTIMATE from peak chip numbers (roofline), not measured",
                          **roofline(config, topology, mesh_shape, rules, tokens, xla, per_token,
                                     training=target.training,
                                     passes=mxu_passes(config, target.matmul_precision))}
  return report


def search_batch(config: Qwen2Config, topology: Topology, mesh_config: sharding.MeshConfig,
                 rules: sharding.Rules, seq_len: int, *, target: Target,
                 hbm_margin: float = 0.05, max_batch: int | None = None,
                 on_probe: Callable[[Compiled], None] | None = None
                 ) -> tuple[Compiled | None, list[Compiled]]:
  """The largest global batch (a multiple of the batch shards) whose step fits.

  Per-device memory is close to linear in the batch, so after probing 1 and 2 multiples each
  next probe is the line's prediction through the two largest fitting probes, kept strictly
  between the largest fit and the smallest non-fit; it ends when they are adjacent (usually 4
  or 5 compiles instead of the 7 to 10 of doubling plus bisection). Returns (the best fitting
  compile or None, every probe in order).
  """
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(mesh_config, devices)
  unit = sharding.num_batch_shards(mesh, rules)
  budget = (1 - hbm_margin) * topology.chip.hbm_bytes
  probes: list[Compiled] = []

  def probe(multiple: int) -> bool:
    c = compile_step(config, topology, mesh_config, rules, multiple * unit, seq_len,
                     target=target, hbm_margin=hbm_margin, devices=devices)
    for p in probes:  # keep only the best executable alive (a 72B one holds host memory)
      if c.fits and p.fits and p.batch_size < c.batch_size:
        p.compiled = None
    if not c.fits:
      c.compiled = None
    probes.append(c)
    if on_probe is not None:
      on_probe(c)
    return c.fits

  limit = max(1, (max_batch or 1 << 30) // unit)
  good, bad = 0, limit + 1
  candidate = 1
  while bad - good > 1:
    if probe(candidate):
      good = candidate
    else:
      bad = candidate
    fitting = sorted((p for p in probes if p.fits), key=lambda p: p.batch_size)[-2:]
    if len(fitting) == 2:
      (b0, m0), (b1, m1) = [(p.batch_size // unit, p.memory["total_bytes"]) for p in fitting]
      slope = max((m1 - m0) / (b1 - b0), 1.0)
      candidate = int((budget - m1) / slope) + b1
    else:
      candidate = 2 * good if good else 1
    candidate = min(max(candidate, good + 1), bad - 1)
  if good == 0:
    return None, probes
  best = max((p for p in probes if p.fits), key=lambda p: p.batch_size)
  return best, probes
