"""The prepacked CPU matmul (`qwen2_jax.kernels.cpu_matmul`): the C++ extension is built, and
each register kernel (AVX-512 panels of 32, AVX2 panels of 16, the portable loop for any other
width) equals the float64 product on random inputs, with padded panels, K blocks, row blocks
and the thread split."""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.kernels import cpu_matmul

X86 = platform.machine().lower() in ("x86_64", "amd64")
# Elsewhere the extension is not built (setup.py), and the engines keep XLA's dots; on x86-64 a
# missing extension fails `test_extension_is_built_and_picks_this_cpus_kernel`.
needs_extension = pytest.mark.skipif(not X86, reason="the extension is built on x86-64 only")


def _cpu_flags() -> set[str]:
  with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
    for line in f:
      if line.startswith("flags"):
        return set(line.split(":", 1)[1].split())
  return set()


@needs_extension
def test_extension_is_built_and_picks_this_cpus_kernel():
  """`pip install` (editable or wheel) builds the extension on x86-64; it runs the widest build
  the CPU has (AVX-512 F/VL/BW/DQ, else AVX2+FMA), or a narrower one named by
  QWEN2_JAX_CPU_ISA (`tests/test_cpu_extension.py` runs the kernel tests that way); the panel
  width follows: 32, 16, 0."""
  flags = _cpu_flags()
  best = ("avx512" if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags
          else "avx2" if {"avx2", "fma"} <= flags else "generic")
  order = ["generic", "avx2", "avx512"]
  asked = os.environ.get("QWEN2_JAX_CPU_ISA", "avx512").replace("amx", "avx512")
  want = order[min(order.index(asked), order.index(best))]
  assert cpu_matmul.cpu_extension.module().isa() == want
  assert cpu_matmul.panel_width() == {"avx512": 32, "avx2": 16, "generic": 0}[want]
  # AMX for the bf16x3 matmul: the CPU has it (and the kernel grants the tile state, Linux
  # 5.16+) and the variable is unset or "amx".
  has_amx = {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags and want == "avx512"
  assert cpu_matmul.amx() == (has_amx and os.environ.get("QWEN2_JAX_CPU_ISA", "amx") == "amx")


# (rows, K, N): one row; row counts that are not multiples of the row blocks (12 / 6 / 8); K
# across the K blocks (64 panel rows for <= 32 rows, 512 above); N not a multiple of any panel
# width (zero-padded last panel, less or more than half a panel); a Qwen2-0.5B MLP shape large
# enough for the thread split.
SHAPES = [(1, 64, 96), (3, 70, 45), (5, 40, 59), (13, 257, 100), (16, 513, 33), (37, 96, 130),
          (40, 1100, 70), (16, 896, 4864)]


@needs_extension
@pytest.mark.parametrize("nr", [32, 16, 8])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_packed_matmul_equals_the_float64_product(nr, m, k, n):
  """Within 2e-6 of the largest |y| (float32 rounding over K <= 896 terms), for panel widths
  32 (AVX-512 kernel where the CPU has it), 16 (AVX2) and 8 (the portable loop)."""
  rng = np.random.default_rng(m * 1000 + k + n)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((k, n), np.float32)
  packed = cpu_matmul.pack(w, nr)
  assert packed.shape == (-(-n // nr), k, nr)
  got = np.asarray(jax.jit(cpu_matmul.packed_matmul, static_argnums=2)(x, packed, n))
  want = x.astype(np.float64) @ w.astype(np.float64)
  assert got.shape == (m, n)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
  ref = cpu_matmul.packed_matmul_reference(jnp.asarray(x), jnp.asarray(packed), n)
  np.testing.assert_allclose(got, np.asarray(ref), rtol=0, atol=2e-6 * np.abs(want).max())


@needs_extension
@pytest.mark.parametrize("nr", [32, 16])
def test_empty_inputs(nr):
  """No rows: an empty result; K = 0: zeros (the empty sum), not uninitialised memory."""
  empty = cpu_matmul.packed_matmul(jnp.zeros((0, 8), jnp.float32),
                                   jnp.ones((2, 8, nr), jnp.float32), nr + 3)
  assert empty.shape == (0, nr + 3)
  for _ in range(3):  # fresh output buffers each time
    got = jax.jit(cpu_matmul.packed_matmul, static_argnums=2)(
        jnp.ones((3, 0), jnp.float32), jnp.ones((2, 0, nr), jnp.float32), nr + 3)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((3, nr + 3), np.float32))


@needs_extension
def test_leading_axes_and_pack_round_trip():
  """x [B, T, K] keeps its leading axes; `unpack(pack(w))` is w exactly, in numpy and jnp."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 40), np.float32)
  w = rng.standard_normal((40, 70), np.float32)
  for nr in (32, 16):
    packed = cpu_matmul.pack(w, nr)
    np.testing.assert_array_equal(cpu_matmul.unpack(packed, 70), w)
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack(cpu_matmul.pack(
        jnp.asarray(w), nr), 70)), w)
    got = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), jnp.asarray(packed), 70))
    want = np.einsum("btk,kn->btn", x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@needs_extension
def test_bad_inputs_name_the_problem():
  """Another dtype or shapes that do not fit raise one-line errors before any program runs."""
  packed = jnp.zeros((2, 8, 16), jnp.float32)
  with pytest.raises(TypeError, match="float32 only"):
    cpu_matmul.packed_matmul(jnp.zeros((3, 8), jnp.bfloat16), packed, 32)
  with pytest.raises(ValueError, match=r"do not make \[\.\.\., 32\]"):
    cpu_matmul.packed_matmul(jnp.zeros((3, 9), jnp.float32), packed, 32)
  with pytest.raises(ValueError, match=r"do not make \[\.\.\., 40\]"):
    cpu_matmul.packed_matmul(jnp.zeros((3, 8), jnp.float32), packed, 40)


def test_engines_pack_per_the_environment_switch(monkeypatch):
  """QWEN2_JAX_PACKED_MATMUL: "auto" packs with the AVX-512 kernel only, "1" with any built
  kernel, "0" never; float32 compute only; another value is a named error."""
  # pylint: disable-next=import-outside-toplevel
  from qwen2_jax.infer import static_engine, validation
  from qwen2_jax import presets  # pylint: disable=import-outside-toplevel
  config = presets.get_preset("qwen2-0.5b").replace(dtype="float32")
  width = cpu_matmul.panel_width()
  for mode, want in (("auto", width if width == 32 else 0), ("1", width), ("0", 0)):
    monkeypatch.setenv("QWEN2_JAX_PACKED_MATMUL", mode)
    assert static_engine.cpu_packed_width(config) == want
    assert static_engine.cpu_packed_width(config.replace(dtype="bfloat16")) == 0
  monkeypatch.setenv("QWEN2_JAX_PACKED_MATMUL", "yes")
  with pytest.raises(validation.InvalidParameterError, match="QWEN2_JAX_PACKED_MATMUL"):
    static_engine.cpu_packed_width(config)


# (rows, K, N): one row; rows across the 16-row tiles (17, 20, 40, 48: a partial last tile, a
# pair of row blocks (2 x 2 tiles) without and with a last single block; 64, 70, 130:
# four-panel passes per row block, x split into hi and lo by 16-row tasks); K not a multiple
# of the 32-row k-block; N not a multiple of the 16-column panel, and across the 4-panel tile
# pass and the panel pairs (an odd last panel, also in a later L2-sized chunk: 20 x 896 x 520
# has chunks of 16, 16 and 1 panels; 64 x 96 x 336 ends on a single panel at 64 rows); a
# Qwen2-0.5B MLP shape large enough for the thread split.
SHAPES_X3 = [(1, 64, 96), (3, 70, 45), (16, 31, 17), (17, 100, 130), (40, 257, 70),
             (70, 100, 40), (130, 64, 48), (16, 896, 4864), (48, 896, 1152), (20, 896, 520),
             (64, 96, 336)]


@needs_extension
@pytest.mark.parametrize("m,k,n", SHAPES_X3)
def test_bf16x3_matmul_equals_its_reference(m, k, n):
  """The bf16x3 kernel (AMX tiles where `amx()`, else the portable loop) equals the three fp32
  products of the bf16 parts within 2e-6 of the largest |y| (fp32 sums in another order), and
  the float64 product within 3e-5 (the bf16x3 error: ~2^-16 per product)."""
  rng = np.random.default_rng(m * 1000 + k + n)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((k, n), np.float32)
  packed = cpu_matmul.pack_bf16x3(w)
  assert packed.shape == (-(-n // 16), -(-k // 32), 2, 512) and packed.dtype == jnp.bfloat16
  got = np.asarray(jax.jit(cpu_matmul.packed_matmul, static_argnums=2)(x, packed, n))
  assert got.shape == (m, n)
  ref = np.asarray(cpu_matmul.packed_matmul_bf16x3_reference(jnp.asarray(x),
                                                             jnp.asarray(packed), n))
  exact = x.astype(np.float64) @ w.astype(np.float64)
  scale = np.abs(exact).max()
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * scale)
  np.testing.assert_allclose(got, exact, rtol=0, atol=3e-5 * scale)


# [W_gate | W_up] shapes (m, K, F): one row; a partial row block; the row pairs (32, 40, 48
# rows) and the four-panel loop (16, 64, 130 rows); K not a multiple of 32; chunks of several
# tasks at Qwen2-0.5B's F; a width of one output panel pair (F 32).
SHAPES_SWIGLU = [(1, 64, 32), (3, 70, 64), (16, 896, 4864), (32, 100, 96), (40, 257, 64),
                 (48, 64, 160), (64, 96, 128), (130, 64, 96), (20, 896, 1024)]


@needs_extension
@pytest.mark.parametrize("m,k,f", SHAPES_SWIGLU)
def test_bf16x3_swiglu_equals_its_reference(m, k, f):
  """`packed_swiglu` (SwiGLU applied to each tile of products) equals silu(g) * u of the
  bf16x3 reference products within 3e-6 of the largest |h|, with 8 gate columns scaled up so
  that g reaches silu's saturated tails (|g| beyond 87, where the kernel's sigmoid is 0), on AMX
  tiles or the portable loop."""
  rng = np.random.default_rng(m * 1000 + k + f)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((k, 2 * f), np.float32) * np.float32(4.0 / np.sqrt(k))
  w[:, :8] *= 10  # some gate columns deep in silu's tails
  packed = cpu_matmul.pack_bf16x3(w)
  assert cpu_matmul.swiglu_fusable(packed, 2 * f)
  got = np.asarray(jax.jit(cpu_matmul.packed_swiglu, static_argnums=2)(x, packed, 2 * f))
  assert got.shape == (m, f)
  ref = np.asarray(cpu_matmul.packed_swiglu_reference(jnp.asarray(x), jnp.asarray(packed), 2 * f))
  np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 * np.abs(ref).max())
  # Against silu(g) * u of `packed_matmul`'s own products (the same sums in the same order),
  # every output agrees to 1e-6 relative: the in-kernel silu is fp32-accurate, not just close.
  g, u = np.split(np.asarray(jax.jit(cpu_matmul.packed_matmul, static_argnums=2)(x, packed, 2 * f)),
                  2, axis=-1)
  g64 = g.astype(np.float64)
  exact = g64 / (1 + np.exp(-g64)) * u
  np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-30)


@needs_extension
def test_bf16x3_swiglu_refuses_what_it_cannot_fuse():
  """F not a multiple of 32: `swiglu_fusable` is False and `packed_swiglu` names the reason;
  fp32 panels: `swiglu_fusable` is False. `layers.SwiGLU` then splits the packed product."""
  w = np.ones((64, 96), np.float32)  # F = 48
  packed = cpu_matmul.pack_bf16x3(w)
  assert not cpu_matmul.swiglu_fusable(packed, 96)
  with pytest.raises(ValueError, match=r"n % 64 == 0 only, got bfloat16 tiles and n=96"):
    cpu_matmul.packed_swiglu(jnp.ones((2, 64), jnp.float32), packed, 96)
  panels = cpu_matmul.pack(np.ones((64, 128), np.float32), 16)
  assert not cpu_matmul.swiglu_fusable(panels, 128)


# (m, K, F, N): one row; a partial row block; Qwen2-0.5B's decode MLP; K and N not multiples of
# 32 and 16; the row pairs (40 rows) and the four-panel loop (64, 130 rows); several tasks.
SHAPES_MLP = [(1, 64, 32, 40), (5, 100, 64, 896), (16, 896, 4864, 896), (17, 70, 96, 33),
              (40, 257, 64, 20), (64, 128, 160, 64), (130, 96, 128, 50)]


@needs_extension
@pytest.mark.parametrize("m,k,f,n", SHAPES_MLP)
def test_bf16x3_mlp_is_swiglu_then_down_bit_for_bit(m, k, f, n):
  """`packed_mlp` (the SwiGLU tiles stored as the down products' bf16 parts) gives the same bits
  as `packed_swiglu` followed by `packed_matmul`, and equals its bf16x3 reference within 1e-5 of
  the largest |y|, with some gate columns in silu's saturated tails; leading axes are kept. (The
  reference's silu differs from the kernel's in the last bits, which can move an activation's
  bf16 split; over F = 4864 terms that reached 3.7e-6 of the largest |y| in the portable loop.)"""
  rng = np.random.default_rng(m * 1000 + k + f + n)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((k, 2 * f), np.float32) * np.float32(4.0 / np.sqrt(k))
  w[:, :8] *= 10
  gate_up = cpu_matmul.pack_bf16x3(w)
  down = cpu_matmul.pack_bf16x3(rng.standard_normal((f, n), np.float32) / np.float32(np.sqrt(f)))
  got = np.asarray(jax.jit(cpu_matmul.packed_mlp, static_argnums=(3, 4))(x, gate_up, down, f, n))
  assert got.shape == (m, n)
  two = jax.jit(lambda x: cpu_matmul.packed_matmul(cpu_matmul.packed_swiglu(x, gate_up, 2 * f),
                                                   down, n))(x)
  np.testing.assert_array_equal(got.view(np.uint32), np.asarray(two).view(np.uint32))
  ref = np.asarray(cpu_matmul.packed_mlp_reference(jnp.asarray(x), jnp.asarray(gate_up),
                                                   jnp.asarray(down), f, n))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  batched = cpu_matmul.packed_mlp(jnp.asarray(x).reshape(1, m, k), gate_up, down, f, n)
  np.testing.assert_array_equal(np.asarray(batched)[0], got)


@needs_extension
def test_bf16x3_mlp_refuses_mismatched_tiles():
  """`packed_mlp` names what does not fit: f not a multiple of 32 (48; and 60, whose 120 gate/up
  columns pack into as many tiles as f = 64 would), fp32 panels, gate/up or down tiles of
  another f; K = 0 and f = 0 (20 rows: more than one row block) give zeros."""
  x = jnp.ones((2, 64), jnp.float32)
  down = cpu_matmul.pack_bf16x3(np.ones((48, 8), np.float32))
  for f in (48, 60):
    gate_up = cpu_matmul.pack_bf16x3(np.ones((64, 2 * f), np.float32))
    with pytest.raises(ValueError, match=rf"packed_mlp: bf16x3 tiles with f % 32 == 0 only.*f={f}"):
      cpu_matmul.packed_mlp(x, gate_up, cpu_matmul.pack_bf16x3(np.ones((f, 8), np.float32)), f, 8)
  with pytest.raises(ValueError, match=r"packed_mlp: bf16x3 tiles with f % 32 == 0 only"):
    cpu_matmul.packed_mlp(x, cpu_matmul.pack(np.ones((64, 128), np.float32), 16), down, 64, 8)
  with pytest.raises(ValueError, match=r"do not make \[\.\.\., 8\] through f=64"):  # down's f: 96
    cpu_matmul.packed_mlp(x, cpu_matmul.pack_bf16x3(np.ones((64, 128), np.float32)),
                          cpu_matmul.pack_bf16x3(np.ones((96, 8), np.float32)), 64, 8)
  with pytest.raises(ValueError, match=r"do not make \[\.\.\., 8\] through f=32"):  # gate/up's: 64
    cpu_matmul.packed_mlp(x, cpu_matmul.pack_bf16x3(np.ones((64, 128), np.float32)),
                          cpu_matmul.pack_bf16x3(np.ones((32, 8), np.float32)), 32, 8)
  empty = cpu_matmul.packed_mlp(jnp.ones((3, 0), jnp.float32),
                                cpu_matmul.pack_bf16x3(np.ones((0, 64), np.float32)),
                                cpu_matmul.pack_bf16x3(np.ones((32, 5), np.float32)), 32, 5)
  np.testing.assert_array_equal(np.asarray(empty), np.zeros((3, 5), np.float32))
  no_f = cpu_matmul.packed_mlp(jnp.ones((20, 64), jnp.float32),
                               cpu_matmul.pack_bf16x3(np.ones((64, 0), np.float32)),
                               cpu_matmul.pack_bf16x3(np.ones((0, 5), np.float32)), 0, 5)
  np.testing.assert_array_equal(np.asarray(no_f), np.zeros((20, 5), np.float32))


@needs_extension
def test_bf16x3_pack_round_trip_and_leading_axes():
  """`unpack_bf16x3(pack_bf16x3(w))` is w to 2^-16 of each |w| (hi + lo keep 16 significand
  bits), the same in numpy and jnp; hi is w rounded to bf16; x [B, T, K] keeps its leading axes;
  K = 0 gives zeros; wrong tiles are a named error."""
  rng = np.random.default_rng(1)
  w = rng.standard_normal((40, 70), np.float32)
  packed = cpu_matmul.pack_bf16x3(w)
  np.testing.assert_array_equal(np.asarray(cpu_matmul.pack_bf16x3(jnp.asarray(w))).view(np.uint16),
                                packed.view(np.uint16))
  back = cpu_matmul.unpack_bf16x3(packed, 40, 70)
  assert back.shape == (40, 70) and back.dtype == np.float32
  assert np.all(np.abs(back - w) <= 2.0 ** -16 * np.abs(w))
  hi_only = packed.copy()
  hi_only[:, :, 1] = 0
  np.testing.assert_array_equal(cpu_matmul.unpack_bf16x3(hi_only, 40, 70),
                                w.astype(jnp.bfloat16).astype(np.float32))
  x = rng.standard_normal((2, 5, 40), np.float32)
  got = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), jnp.asarray(packed), 70))
  want = np.einsum("btk,kn->btn", x.astype(np.float64), w.astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=0, atol=3e-5 * np.abs(want).max())
  zeros = cpu_matmul.packed_matmul(jnp.ones((3, 0), jnp.float32),
                                   jnp.ones((2, 0, 2, 512), jnp.bfloat16), 20)
  np.testing.assert_array_equal(np.asarray(zeros), np.zeros((3, 20), np.float32))
  with pytest.raises(ValueError, match=r"bf16x3 tiles .* do not make \[\.\.\., 70\]"):
    cpu_matmul.packed_matmul(jnp.zeros((3, 70), jnp.float32), jnp.asarray(packed), 70)
  with pytest.raises(TypeError, match="x must be float32"):
    cpu_matmul.packed_matmul(jnp.zeros((3, 40), jnp.bfloat16), jnp.asarray(packed), 70)
