// Prepacked fp32 matmul for XLA:CPU, as an XLA FFI custom call: y[M, N] = x[M, K] @ W[K, N], with
// W stored once as panels [ceil(N / NR), K, NR] (NR output columns per panel, zero-padded).
//
// Why by hand: XLA:CPU's dot back ends (YNNPACK, Eigen, oneDNN) repack the weight on every call,
// which dominates the few-row matmuls of a decode step; packed once at load and streamed, a chain
// of Qwen2-0.5B's 16-row decode matmuls took 117-120 ms against 168 ms (docs/benchmarks.md).
//
// The register kernels are chosen at run time: AVX-512 (NR 32, up to 12 rows per block) or
// AVX2+FMA (NR 16, up to 6 rows); any other panel width runs a portable loop. Work is split over
// panels between the caller and XLA's intra-op thread pool.
//
// A second custom call multiplies in three bf16 passes on AMX tiles (see "bf16x3" below), for
// the engines' opt-in matmul_precision "high"; a third does the same for an MLP's [W_gate | W_up]
// and applies SwiGLU to each finished tile, so the [M, 2F] product is never stored; a fourth runs
// a whole SwiGLU MLP, the SwiGLU tiles going straight into the down projection's bf16 parts.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace qwen2_jax_cpu;  // NOLINT: the shared helpers

// Rows of a panel kept in cache while every row block uses them: short blocks for few rows
// (the panels stream from memory), long ones for many (fewer partial sums stored and reloaded).
constexpr int64_t kKBlockFew = 64, kKBlockMany = 512;
constexpr int64_t kFewRows = 32;
constexpr int kPrefetch = 2048;  // bytes ahead in the panel stream (first row block)

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [P, K, NR]
  float* y;        // [M, N]
  int64_t m, k, n, nr, panels;
};

// ---------------------------------------------------------------------------------- AVX-512

template <int MR>
__attribute__((target("avx512f"))) void Block512(const float* x, int64_t ldx, const float* w,
                                                 int64_t kc, float* y, int64_t ldy, bool first,
                                                 int64_t ncols, bool prefetch) {
  __m512 lo[MR], hi[MR];
  const __mmask16 mlo = ncols >= 16 ? 0xFFFF : (__mmask16)((1u << ncols) - 1);
  const __mmask16 mhi =
      ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    if (first) {
      lo[r] = _mm512_setzero_ps();
      hi[r] = _mm512_setzero_ps();
    } else {
      lo[r] = _mm512_maskz_loadu_ps(mlo, y + r * ldy);
      hi[r] = _mm512_maskz_loadu_ps(mhi, y + r * ldy + 16);
    }
  }
  for (int64_t i = 0; i < kc; ++i) {
    const char* line = reinterpret_cast<const char*>(w + i * 32);
    if (prefetch) {  // the stream of panels, kPrefetch bytes ahead (no fault past the end)
      _mm_prefetch(line + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(line + kPrefetch + 64, _MM_HINT_T0);
    }
    const __m512 b0 = _mm512_loadu_ps(w + i * 32);
    const __m512 b1 = _mm512_loadu_ps(w + i * 32 + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
      lo[r] = _mm512_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(a, b1, hi[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, mlo, lo[r]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, mhi, hi[r]);
  }
}

// ------------------------------------------------------------------------------------- AVX2

template <int MR>
__attribute__((target("avx2,fma"))) void Block256(const float* x, int64_t ldx, const float* w,
                                                  int64_t kc, float* y, int64_t ldy, bool first,
                                                  int64_t ncols, bool prefetch) {
  __m256 lo[MR], hi[MR];
  if (ncols < 16 && !first) {  // a partial last panel: through a full-width scratch tile
    alignas(32) float tile[MR * 16] = {};
    for (int r = 0; r < MR; ++r) std::memcpy(tile + r * 16, y + r * ldy, ncols * sizeof(float));
    for (int r = 0; r < MR; ++r) {
      lo[r] = _mm256_load_ps(tile + r * 16);
      hi[r] = _mm256_load_ps(tile + r * 16 + 8);
    }
  } else {
    for (int r = 0; r < MR; ++r) {
      lo[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy);
      hi[r] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + 8);
    }
  }
  for (int64_t i = 0; i < kc; ++i) {
    if (prefetch)  // one 64-byte line per row of the panel
      _mm_prefetch(reinterpret_cast<const char*>(w + i * 16) + kPrefetch, _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(w + i * 16);
    const __m256 b1 = _mm256_loadu_ps(w + i * 16 + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
    }
  }
  if (ncols < 16) {
    alignas(32) float tile[MR * 16];
    for (int r = 0; r < MR; ++r) {
      _mm256_store_ps(tile + r * 16, lo[r]);
      _mm256_store_ps(tile + r * 16 + 8, hi[r]);
      std::memcpy(y + r * ldy, tile + r * 16, ncols * sizeof(float));
    }
  } else {
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(y + r * ldy, lo[r]);
      _mm256_storeu_ps(y + r * ldy + 8, hi[r]);
    }
  }
}

// ------------------------------------------------------------------------------------ generic

void BlockGeneric(const float* x, int64_t ldx, const float* w, int64_t nr, int64_t rows,
                  int64_t kc, float* y, int64_t ldy, bool first, int64_t ncols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < ncols; ++j) {
      float acc = first ? 0.0f : y[r * ldy + j];
      for (int64_t i = 0; i < kc; ++i) acc += x[r * ldx + i] * w[i * nr + j];
      y[r * ldy + j] = acc;
    }
  }
}

// The register kernel for this panel width on this CPU (`rows_max` rows per block).
Isa KernelFor(int64_t nr, int* rows_max) {
  const Isa best = BestIsa();
  if (nr == 32 && best == Isa::kAvx512) return *rows_max = 12, Isa::kAvx512;
  if (nr == 16 && best != Isa::kGeneric) return *rows_max = 6, Isa::kAvx2;
  return *rows_max = 8, Isa::kGeneric;
}

template <template <int> class F, typename... Args>
void ByRows(int rows, Args... args) {
  switch (rows) {
    case 1: return F<1>::Run(args...);
    case 2: return F<2>::Run(args...);
    case 3: return F<3>::Run(args...);
    case 4: return F<4>::Run(args...);
    case 5: return F<5>::Run(args...);
    case 6: return F<6>::Run(args...);
    case 7: return F<7>::Run(args...);
    case 8: return F<8>::Run(args...);
    case 9: return F<9>::Run(args...);
    case 10: return F<10>::Run(args...);
    case 11: return F<11>::Run(args...);
    default: return F<12>::Run(args...);
  }
}

template <int MR>
struct Run512 {
  static void Run(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy,
                  bool first, int64_t ncols, bool prefetch) {
    Block512<MR>(x, ldx, w, kc, y, ldy, first, ncols, prefetch);
  }
};

template <int MR>
struct Run256 {
  static void Run(const float* x, int64_t ldx, const float* w, int64_t kc, float* y, int64_t ldy,
                  bool first, int64_t ncols, bool prefetch) {
    if constexpr (MR <= 6) Block256<MR>(x, ldx, w, kc, y, ldy, first, ncols, prefetch);
  }
};

// Panels [p0, p1) of the product.
void RunPanels(const Problem& pb, int64_t p0, int64_t p1) {
  int rows_max = 8;
  const Isa isa = KernelFor(pb.nr, &rows_max);
  // Equal row blocks (16 rows: 8 + 8, not 12 + 4).
  rows_max = static_cast<int>((pb.m + (pb.m + rows_max - 1) / rows_max - 1) /
                              ((pb.m + rows_max - 1) / rows_max));
  const int64_t kblock = pb.m <= kFewRows ? kKBlockFew : kKBlockMany;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col = p * pb.nr;
    const int64_t ncols = std::min(pb.nr, pb.n - col);
    const float* panel = pb.w + p * pb.k * pb.nr;
    for (int64_t k0 = 0; k0 < pb.k; k0 += kblock) {
      const int64_t kc = std::min(kblock, pb.k - k0);
      for (int64_t m0 = 0; m0 < pb.m; m0 += rows_max) {
        const int rows = static_cast<int>(std::min<int64_t>(rows_max, pb.m - m0));
        const float* xb = pb.x + m0 * pb.k + k0;
        const float* wb = panel + k0 * pb.nr;
        float* yb = pb.y + m0 * pb.n + col;
        switch (isa) {
          case Isa::kAvx512:
            ByRows<Run512>(rows, xb, pb.k, wb, kc, yb, pb.n, k0 == 0, ncols, m0 == 0);
            break;
          case Isa::kAvx2:
            ByRows<Run256>(rows, xb, pb.k, wb, kc, yb, pb.n, k0 == 0, ncols, m0 == 0);
            break;
          default:
            BlockGeneric(xb, pb.k, wb, pb.nr, rows, kc, yb, pb.n, k0 == 0, ncols);
        }
      }
    }
  }
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  bool shapes_ok = wd.size() == 3 && xd.size() >= 1 && yd.size() == xd.size();
  for (size_t i = 0; shapes_ok && i + 1 < xd.size(); ++i) shapes_ok = xd[i] == yd[i];
  if (!shapes_ok)
    return ffi::Error::InvalidArgument("packed_matmul: x [..., K], w [P, K, NR], y [..., N]");
  Problem pb;
  pb.k = xd.back();
  pb.n = yd.back();
  pb.panels = wd[0];
  pb.nr = wd[2];
  if (wd[1] != pb.k || pb.panels * pb.nr < pb.n || (pb.panels - 1) * pb.nr >= pb.n)
    return ffi::Error::InvalidArgument("packed_matmul: w's panels do not match x's K and y's N");
  pb.m = pb.n == 0 ? 0 : y->element_count() / pb.n;  // x's leading axes (equal to y's)
  pb.x = x.typed_data();
  pb.w = w.typed_data();
  pb.y = y->typed_data();
  if (pb.m == 0 || pb.n == 0) return ffi::Error::Success();
  if (pb.k == 0) {
    std::fill(pb.y, pb.y + pb.m * pb.n, 0.0f);
    return ffi::Error::Success();
  }
  // About 2 MFLOP per chunk, at least one panel; one thread below two chunks.
  const int64_t panel_flops = 2 * pb.m * pb.k * pb.nr;
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 21) / panel_flops);
  const int64_t chunks = (pb.panels + chunk - 1) / chunk;
  if (chunks < 2) {
    RunPanels(pb, 0, pb.panels);
    return ffi::Error::Success();
  }
  ParallelFor(pool, chunks, [&](int64_t c) {
    RunPanels(pb, c * chunk, std::min(pb.panels, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------- bf16x3 (AMX-BF16)
//
// y = x @ W in three bf16 products accumulated in fp32: x_hi W_hi + x_lo W_hi + x_hi W_lo, where
// v_hi = bf16(v) and v_lo = bf16(v - v_hi) (the algorithm of lax.DotAlgorithmPreset
// BF16_BF16_F32_X3; Henry, Tang and Heinecke, "Leveraging the bfloat16 Artificial Intelligence
// Datatype For Higher-Precision Computations", 2019). W is packed once as [P, Kb, 2, 512] bf16:
// for panel p (16 output columns) and k-block b (32 input rows), the hi and then the lo part,
// each a 16x32 AMX tile in VNNI order (element (k, j) at (k / 2) * 32 + j * 2 + k % 2), zero-
// padded past K and N. 4 bytes per weight, as fp32, so a decode step streams the same bytes; the
// products run on the tile unit instead of the FMA units.

constexpr int64_t kTileElems = 512;  // bf16 per 16 x 32 tile

struct ProblemX3 {
  const uint16_t* xh = nullptr;  // [mpad, kpad] hi parts of x, zero-padded
  const uint16_t* xl = nullptr;  // [mpad, kpad] lo parts
  const uint16_t* w = nullptr;   // [P, Kb, 2, 512]
  float* y = nullptr;            // [M, N]
  int64_t m, mpad, kb, n, panels;
  // Where set (SwiGLU only): y's hi and lo bf16 parts [mpad, n] instead of y (the input split of
  // a bf16x3 matmul that reads y).
  uint16_t* yh = nullptr;
  uint16_t* yl = nullptr;
  // SwiGLU: W is gate's panels then up's (P = 2 * N / 16, N % 32 == 0) and y = silu(x W_gate) *
  // (x W_up). The loops walk "logical" panels that interleave the two (Panel()).
  bool swiglu = false;
};

// The stored panel of logical panel l: itself, or for SwiGLU, in groups of `group` (2: the row
// pairs' loop; 4: the four-panel loop) the gate panels of group / 2 output panels, then up's.
inline int64_t Panel(const ProblemX3& pb, int64_t l, int group) {
  if (!pb.swiglu) return l;
  const int64_t half = group / 2, first = l / group * half, j = l % group;
  return j < half ? first + j : pb.n / 16 + first + j - half;
}

// y[r, c] = silu(g[r, c]) * u[r, c] for r < rows, c < 16: g, u 16 x 16 tiles as stored, y with
// leading dimension ldy. silu(g) = g / (1 + exp(-g)), exp to ~2e-7 (ExpNonPositive of -|g|);
// below g = -87 the sigmoid is 0 (as jax.nn.silu's, which also gives NaN at g = -inf).
QWEN2_JAX_INLINE F16 SwigluRow(const float* g, const float* u) {
  const F16 a = Load(g), b = Load(u);
  const F16 e = ExpNonPositive(a > 0.0f ? -a : a);  // exp(-|g|)
  F16 sigmoid = a > 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  sigmoid = a < -87.0f ? F16{} : sigmoid;  // ExpNonPositive stops at exp(-87)
  return a * sigmoid * b;
}

QWEN2_JAX_INLINE void SwigluTileBody(const float* g, const float* u, int64_t rows, float* y,
                                     int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) Store(y + r * ldy, SwigluRow(g + r * 16, u + r * 16));
}

[[maybe_unused]] __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void SwigluTile(
    const float* g, const float* u, int64_t rows, float* y, int64_t ldy) {
  SwigluTileBody(g, u, rows, y, ldy);
}

// The bf16 bits of 16 floats, in the low halves (round to nearest even; NaN stays NaN).
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint16_t U16x16u __attribute__((vector_size(32), aligned(2)));

QWEN2_JAX_INLINE U32x16 Bf16Bits(F16 v) {
  const U32x16 u = reinterpret_cast<U32x16>(v);
  const U32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded;
}

// 16 floats -> their hi and lo bf16 parts (v_hi = bf16(v), v_lo = bf16(v - v_hi)).
QWEN2_JAX_INLINE void StoreSplit(F16 v, uint16_t* h, uint16_t* l) {
  const U32x16 hb = Bf16Bits(v);
  const U32x16 lb = Bf16Bits(v - reinterpret_cast<F16>(hb << 16));
  *reinterpret_cast<U16x16u*>(h) = __builtin_convertvector(hb, U16x16);
  *reinterpret_cast<U16x16u*>(l) = __builtin_convertvector(lb, U16x16);
}

// SwigluTileBody's values, stored as their bf16 parts (leading dimension ld).
QWEN2_JAX_INLINE void SwigluTileSplitBody(const float* g, const float* u, int64_t rows,
                                          uint16_t* yh, uint16_t* yl, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    StoreSplit(SwigluRow(g + r * 16, u + r * 16), yh + r * ld, yl + r * ld);
}

[[maybe_unused]] __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void
SwigluTileSplit(const float* g, const float* u, int64_t rows, uint16_t* yh, uint16_t* yl,
                int64_t ld) {
  SwigluTileSplitBody(g, u, rows, yh, yl, ld);
}

// The SwiGLU tiles of output columns [col, col + 16), rows [row, row + rows): to y, or split.
[[maybe_unused]] inline void SwigluOut(const ProblemX3& pb, const float* g, const float* u,
                                       int64_t row, int64_t rows, int64_t col) {
  if (pb.yh != nullptr) {
    SwigluTileSplit(g, u, rows, pb.yh + row * pb.n + col, pb.yl + row * pb.n + col, pb.n);
  } else {
    SwigluTile(g, u, rows, pb.y + row * pb.n + col, pb.n);
  }
}

inline uint16_t Bf16Scalar(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rows [r0, r1) of x [m, k] -> hi and lo parts [mpad, kpad], zero-padded, 16 at a time.
QWEN2_JAX_INLINE void SplitRowsBody(const float* x, int64_t m, int64_t k, int64_t kpad,
                                    int64_t r0, int64_t r1, uint16_t* xh, uint16_t* xl) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* h = xh + r * kpad;
    uint16_t* l = xl + r * kpad;
    const int64_t valid = r < m ? k : 0;
    int64_t i = 0;
    for (; i + 16 <= valid; i += 16) StoreSplit(Load(x + r * k + i), h + i, l + i);
    for (; i < valid; ++i) {
      const float v = x[r * k + i];
      h[i] = Bf16Scalar(v);
      l[i] = Bf16Scalar(v - Bf16ToFloat(h[i]));
    }
    std::fill(h + i, h + kpad, uint16_t{0});
    std::fill(l + i, l + kpad, uint16_t{0});
  }
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void SplitRows512(
    const float* x, int64_t m, int64_t k, int64_t kpad, int64_t r0, int64_t r1, uint16_t* xh,
    uint16_t* xl) {
  SplitRowsBody(x, m, k, kpad, r0, r1, xh, xl);
}

__attribute__((target("avx2,fma"))) void SplitRows256(const float* x, int64_t m, int64_t k,
                                                      int64_t kpad, int64_t r0, int64_t r1,
                                                      uint16_t* xh, uint16_t* xl) {
  SplitRowsBody(x, m, k, kpad, r0, r1, xh, xl);
}

void SplitRowsGeneric(const float* x, int64_t m, int64_t k, int64_t kpad, int64_t r0,
                      int64_t r1, uint16_t* xh, uint16_t* xl) {
  SplitRowsBody(x, m, k, kpad, r0, r1, xh, xl);
}

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#if QWEN2_JAX_HAVE_AMX
// Copies a 16 x 16 fp32 tile (stored to `out`) into y at (row, col), clipped to y's size.
inline void WriteTile(const ProblemX3& pb, const float* out, int64_t row, int64_t col) {
  const int64_t rows = std::min<int64_t>(16, pb.m - row), cols = std::min<int64_t>(16, pb.n - col);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(pb.y + (row + r) * pb.n + col, out + r * 16, cols * sizeof(float));
}

// Panels [p0, p1) for every row block of 16. The tile unit has eight 1 KiB tiles, and the loads
// set the pace (on a 2-core Xeon, 11.5-16 ns per product with the tiles in L2 against 5.1-6.0
// ns without loads), so the loops reuse what they load:
// - up to 48 rows, row blocks in pairs, two panels at a time: tiles 0-3 accumulate the 2 x 2
//   outputs, 4 and 5 hold x's parts for the two row blocks, 6 and 7 the two panels' W parts
//   (10 loads per 12 products, 4 of them W);
// - every other row block (a last odd one, or all of them from 64 rows), four panels at a
//   time: tiles 0-3 accumulate, 4 and 5 hold x_hi and x_lo, 6 and 7 alternate between panels
//   (10 loads per 12 products, 8 of them W). From 64 rows, pairs measured slower (3-8%).
__attribute__((target("amx-tile,amx-bf16"))) void RunPanelsAmx(const ProblemX3& pb, int64_t p0,
                                                                  int64_t p1) {
  // Eight tiles of 16 rows x 64 bytes (static: some compilers' _tile_loadconfig declares it
  // reads only the first 8 bytes, so stores to a local could be dropped as dead).
  static const TileConfig config = [] {
    TileConfig c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    return c;
  }();
  _tile_loadconfig(&config);
  alignas(64) float out[4][256];
  const int64_t kpad = pb.kb * 32;
  auto tile = [&](int64_t panel, int64_t b) {
    return pb.w + ((panel * pb.kb + b) * 2) * kTileElems;
  };
  // Row pairs up to 48 rows (see above).
  const int64_t pairs_end = pb.mpad <= 48 ? pb.mpad / 32 * 32 : 0;
  int64_t r0 = 0;
  for (; r0 < pairs_end; r0 += 32) {
    const uint16_t* xh = pb.xh + r0 * kpad;
    const uint16_t* xl = pb.xl + r0 * kpad;
    const int64_t lower = 16 * kpad;  // the second row block
    for (int64_t q = p0; q < p1; q += 2) {
      const bool two = q + 1 < p1;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < pb.kb; ++b) {
        const uint16_t* t0 = tile(Panel(pb, q, 2), b);
        const uint16_t* t1 = two ? tile(Panel(pb, q + 1, 2), b) : t0;
        // x_hi W_hi
        _tile_loadd(4, xh + b * 32, kpad * 2);
        _tile_loadd(6, t0, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
          _tile_loadd(7, t1, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        _tile_loadd(5, xh + lower + b * 32, kpad * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (two) _tile_dpbf16ps(3, 5, 7);
        // x_lo W_hi
        _tile_loadd(4, xl + b * 32, kpad * 2);
        _tile_dpbf16ps(0, 4, 6);
        if (two) _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, xl + lower + b * 32, kpad * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (two) _tile_dpbf16ps(3, 5, 7);
        // x_hi W_lo
        _tile_loadd(6, t0 + kTileElems, 64);
        _tile_loadd(4, xh + b * 32, kpad * 2);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
          _tile_loadd(7, t1 + kTileElems, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        _tile_loadd(5, xh + lower + b * 32, kpad * 2);
        _tile_dpbf16ps(2, 5, 6);
        if (two) _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, out[0], 64);
      _tile_stored(1, out[1], 64);
      _tile_stored(2, out[2], 64);
      _tile_stored(3, out[3], 64);
      if (pb.swiglu) {  // tiles 0, 2: gate's; 1, 3: up's, of output panel q / 2
        SwigluOut(pb, out[0], out[1], r0, std::min<int64_t>(16, pb.m - r0), q / 2 * 16);
        if (r0 + 16 < pb.m)
          SwigluOut(pb, out[2], out[3], r0 + 16, std::min<int64_t>(16, pb.m - r0 - 16), q / 2 * 16);
        continue;
      }
      for (int64_t j = 0; j < (two ? 2 : 1); ++j) {
        WriteTile(pb, out[j], r0, (q + j) * 16);
        WriteTile(pb, out[2 + j], r0 + 16, (q + j) * 16);
      }
    }
  }
  for (; r0 < pb.mpad; r0 += 16) {
    const uint16_t* xh = pb.xh + r0 * kpad;
    const uint16_t* xl = pb.xl + r0 * kpad;
    for (int64_t q = p0; q < p1; q += 4) {
      const int64_t np = std::min<int64_t>(4, p1 - q);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t b = 0; b < pb.kb; ++b) {
        _tile_loadd(4, xh + b * 32, kpad * 2);
        _tile_loadd(5, xl + b * 32, kpad * 2);
        // Panels J and J + 1 (if present): x_hi W_hi and x_lo W_hi.
#define QWEN2_JAX_HI_PAIR(J, J1)                                   \
  if (J < np) {                                                    \
    _tile_loadd(6, tile(Panel(pb, q + J, 4), b), 64);              \
    _tile_dpbf16ps(J, 4, 6);                                       \
    if (J1 < np) {                                                 \
      _tile_loadd(7, tile(Panel(pb, q + J1, 4), b), 64);           \
      _tile_dpbf16ps(J1, 4, 7);                                    \
    }                                                              \
    _tile_dpbf16ps(J, 5, 6);                                       \
    if (J1 < np) _tile_dpbf16ps(J1, 5, 7);                         \
  }
        QWEN2_JAX_HI_PAIR(0, 1)
        QWEN2_JAX_HI_PAIR(2, 3)
#undef QWEN2_JAX_HI_PAIR
        // x_hi W_lo for each panel.
#define QWEN2_JAX_LO(J, T)                                         \
  if (J < np) {                                                    \
    _tile_loadd(T, tile(Panel(pb, q + J, 4), b) + kTileElems, 64); \
    _tile_dpbf16ps(J, 4, T);                                       \
  }
        QWEN2_JAX_LO(0, 6)
        QWEN2_JAX_LO(1, 7)
        QWEN2_JAX_LO(2, 6)
        QWEN2_JAX_LO(3, 7)
#undef QWEN2_JAX_LO
      }
      _tile_stored(0, out[0], 64);
      _tile_stored(1, out[1], 64);
      _tile_stored(2, out[2], 64);
      _tile_stored(3, out[3], 64);
      if (pb.swiglu) {  // tiles 0, 1: gate's, 2, 3: up's, of output panels q / 2 and q / 2 + 1
        const int64_t rows = std::min<int64_t>(16, pb.m - r0);
        SwigluOut(pb, out[0], out[2], r0, rows, q / 2 * 16);
        SwigluOut(pb, out[1], out[3], r0, rows, q / 2 * 16 + 16);
        continue;
      }
      for (int64_t j = 0; j < np; ++j) WriteTile(pb, out[j], r0, (q + j) * 16);
    }
  }
  _tile_release();
}
#endif  // QWEN2_JAX_HAVE_AMX

// The same products without AMX, one output at a time (where the CPU or OS lacks it, or
// QWEN2_JAX_CPU_ISA names a narrower build): slow, for correctness anywhere.
void RunPanelsPortable(const ProblemX3& pb, int64_t p0, int64_t p1) {
  const int64_t kpad = pb.kb * 32;
  // Column j of stored panel p, row r.
  auto dot = [&](int64_t r, int64_t p, int64_t j) {
    const uint16_t* xh = pb.xh + r * kpad;
    const uint16_t* xl = pb.xl + r * kpad;
    float acc = 0.0f;
    for (int64_t b = 0; b < pb.kb; ++b) {
      const uint16_t* t = pb.w + ((p * pb.kb + b) * 2) * kTileElems;
      for (int64_t i = 0; i < 32; ++i) {
        const int64_t at = (i / 2) * 32 + j * 2 + i % 2;
        const float wh = Bf16ToFloat(t[at]), wl = Bf16ToFloat(t[kTileElems + at]);
        const float ah = Bf16ToFloat(xh[b * 32 + i]), al = Bf16ToFloat(xl[b * 32 + i]);
        acc += ah * wh + al * wh + ah * wl;
      }
    }
    return acc;
  };
  for (int64_t r = 0; r < pb.m; ++r) {
    if (pb.swiglu) {  // logical panels [p0, p1) hold output panels [p0 / 2, p1 / 2)
      for (int64_t p = p0 / 2; p < p1 / 2; ++p) {
        for (int64_t j = 0; j < 16; ++j) {
          const float g = dot(r, p, j), u = dot(r, pb.n / 16 + p, j);
          const float v = g / (1.0f + std::exp(-g)) * u;
          const int64_t at = r * pb.n + p * 16 + j;
          if (pb.yh != nullptr) {
            pb.yh[at] = Bf16Scalar(v);
            pb.yl[at] = Bf16Scalar(v - Bf16ToFloat(pb.yh[at]));
          } else {
            pb.y[at] = v;
          }
        }
      }
      continue;
    }
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < 16 && p * 16 + j < pb.n; ++j)
        pb.y[r * pb.n + p * 16 + j] = dot(r, p, j);
  }
}

// pb.xh and pb.xl: the hi and lo parts of x [pb.m, k], zero-padded to [pb.mpad, pb.kb * 32], in
// the caller's scratch. It is reused across calls and keeps its largest size (10 MiB for 512
// rows of K 4864) for the life of the thread.
void SplitInput(ffi::ThreadPool& pool, const float* x, int64_t k, ProblemX3& pb) {
  const int64_t kpad = pb.kb * 32;
  thread_local std::vector<uint16_t> split;
  split.resize(static_cast<size_t>(2 * pb.mpad * kpad));
  uint16_t* xh = split.data();
  uint16_t* xl = split.data() + pb.mpad * kpad;
  auto split_rows = ForBestIsa(SplitRows512, SplitRows256, SplitRowsGeneric);
  if (pb.mpad >= 64) {  // 16 rows per task
    ParallelFor(pool, pb.mpad / 16, [&](int64_t c) {
      split_rows(x, pb.m, k, kpad, c * 16, c * 16 + 16, xh, xl);
    });
  } else {
    split_rows(x, pb.m, k, kpad, 0, pb.mpad, xh, xl);
  }
  pb.xh = xh;
  pb.xl = xl;
}

// The products of pb (x's parts set), split over the caller and XLA's pool.
void RunX3(ffi::ThreadPool& pool, const ProblemX3& pb) {
#if QWEN2_JAX_HAVE_AMX
  void (*run)(const ProblemX3&, int64_t, int64_t) =
      AmxUsable() ? RunPanelsAmx : RunPanelsPortable;
#else
  void (*run)(const ProblemX3&, int64_t, int64_t) = RunPanelsPortable;
#endif
  // A chunk of panels per task: 4 (one tile pass) for up to 16 rows, where the panels stream
  // from memory once; for more rows, as many as fit in about 1 MiB of L2, which every row block
  // then reads. Always a multiple of 4, which SwiGLU's grouping (Panel()) relies on: with 2N / 16
  // panels, N % 32 == 0, every task then holds whole groups of gate and up panels.
  int64_t chunk = 4;
  if (pb.mpad > 16) chunk = std::max<int64_t>(4, ((int64_t{1} << 20) / (pb.kb * 2048)) / 4 * 4);
  const int64_t chunks = (pb.panels + chunk - 1) / chunk;
  if (chunks < 2) {
    run(pb, 0, pb.panels);
    return;
  }
  ParallelFor(pool, chunks, [&](int64_t c) {
    run(pb, c * chunk, std::min(pb.panels, (c + 1) * chunk));
  });
}

// y = x @ W, or with `swiglu`, silu(x @ W_gate) * (x @ W_up) for W = [W_gate | W_up].
ffi::Error Bf16x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                  ffi::ResultBuffer<ffi::F32> y, bool swiglu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  bool shapes_ok = wd.size() == 4 && wd[2] == 2 && wd[3] == kTileElems && xd.size() >= 1 &&
                   yd.size() == xd.size();
  for (size_t i = 0; shapes_ok && i + 1 < xd.size(); ++i) shapes_ok = xd[i] == yd[i];
  if (!shapes_ok)
    return ffi::Error::InvalidArgument(
        swiglu ? "packed_swiglu (bf16x3): x [..., K], w [P, Kb, 2, 512], y [..., N]"
               : "packed_matmul (bf16x3): x [..., K], w [P, Kb, 2, 512], y [..., N]");
  const int64_t k = xd.back();
  ProblemX3 pb;
  pb.n = yd.back();
  pb.panels = wd[0];
  pb.kb = wd[1];
  if (pb.kb != (k + 31) / 32 || pb.panels != (pb.n + 15) / 16 * (swiglu ? 2 : 1) ||
      (swiglu && pb.n % 32 != 0))
    return ffi::Error::InvalidArgument(
        swiglu ? "packed_swiglu (bf16x3): w's tiles do not match x's K and 2 * y's N (N % 32 == 0)"
               : "packed_matmul (bf16x3): w's tiles do not match x's K and y's N");
  pb.swiglu = swiglu;
  pb.m = pb.n == 0 ? 0 : y->element_count() / pb.n;
  pb.y = y->typed_data();
  if (pb.m == 0 || pb.n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(pb.y, pb.y + pb.m * pb.n, 0.0f);
    return ffi::Error::Success();
  }
  pb.mpad = (pb.m + 15) / 16 * 16;
  SplitInput(pool, x.typed_data(), k, pb);
  pb.w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  RunX3(pool, pb);
  return ffi::Error::Success();
}

// y = down(silu(x W_gate) * (x W_up)) for w_gu = the bf16x3 packing of [W_gate | W_up] (F columns
// each, F % 32 == 0) and w_down that of W_down [F, N]: the packed_swiglu products, their SwiGLU
// tiles stored straight as the bf16 parts that the down products read (the same bits as
// packed_swiglu followed by the bf16x3 matmul, without the [M, F] fp32 activations or their
// split: at 16 rows of F 4864 the split alone took about 48 us per call).
ffi::Error PackedMlpBf16x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::BF16> w_gu, ffi::Buffer<ffi::BF16> w_down,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), gd = w_gu.dimensions(), dd = w_down.dimensions();
  const auto yd = y->dimensions();
  bool shapes_ok = gd.size() == 4 && gd[2] == 2 && gd[3] == kTileElems && dd.size() == 4 &&
                   dd[2] == 2 && dd[3] == kTileElems && xd.size() >= 1 && yd.size() == xd.size();
  for (size_t i = 0; shapes_ok && i + 1 < xd.size(); ++i) shapes_ok = xd[i] == yd[i];
  if (!shapes_ok)
    return ffi::Error::InvalidArgument(
        "packed_mlp (bf16x3): x [..., K], w_gu and w_down [P, Kb, 2, 512], y [..., N]");
  const int64_t k = xd.back(), n = yd.back(), f = gd[0] * 8;
  if (gd[1] != (k + 31) / 32 || gd[0] % 4 != 0 || dd[1] * 32 != f || dd[0] != (n + 15) / 16)
    return ffi::Error::InvalidArgument(
        "packed_mlp (bf16x3): w_gu's tiles do not match x's K and 2F (F % 32 == 0), or "
        "w_down's do not match F and y's N");
  const int64_t m = n == 0 ? 0 : y->element_count() / n;
  float* out = y->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0 || f == 0) {  // silu(0) * 0, or no activations
    std::fill(out, out + m * n, 0.0f);
    return ffi::Error::Success();
  }
  ProblemX3 up;
  up.m = m;
  up.mpad = (m + 15) / 16 * 16;
  up.kb = gd[1];
  up.n = f;
  up.panels = gd[0];
  up.swiglu = true;
  SplitInput(pool, x.typed_data(), k, up);
  up.w = reinterpret_cast<const uint16_t*>(w_gu.untyped_data());
  // The activations' parts, the caller's scratch as SplitInput's (10 MiB at 512 rows of F 4864);
  // rows past m stay zero.
  thread_local std::vector<uint16_t> hidden;
  hidden.resize(static_cast<size_t>(2 * up.mpad * f));
  up.yh = hidden.data();
  up.yl = hidden.data() + up.mpad * f;
  for (uint16_t* part : {up.yh, up.yl})
    std::fill(part + m * f, part + up.mpad * f, uint16_t{0});
  RunX3(pool, up);
  ProblemX3 down;
  down.m = m;
  down.mpad = up.mpad;
  down.kb = dd[1];
  down.n = n;
  down.panels = dd[0];
  down.xh = up.yh;
  down.xl = up.yl;
  down.w = reinterpret_cast<const uint16_t*>(w_down.untyped_data());
  down.y = out;
  RunX3(pool, down);
  return ffi::Error::Success();
}

ffi::Error PackedMatmulBf16x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  return Bf16x3(pool, x, w, y, false);
}

ffi::Error PackedSwigluBf16x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  return Bf16x3(pool, x, w, y, true);
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPackedMatmulBf16x3, PackedMatmulBf16x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPackedSwigluBf16x3, PackedSwigluBf16x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPackedMlpBf16x3, PackedMlpBf16x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether the bf16x3 matmul runs on AMX here (for `cpu_kernels_module.cc`).
bool Qwen2JaxAmx() { return AmxUsable(); }

// The panel width of this CPU's register kernel (for `cpu_kernels_module.cc`).
int Qwen2JaxPanelWidth() {
  switch (BestIsa()) {
    case Isa::kAvx512: return 32;
    case Isa::kAvx2: return 16;
    default: return 0;
  }
}

// The parallel loops that asked for helpers so far, and those handed to a lingering helper
// (for `cpu_kernels_module.cc`).
void Qwen2JaxLoopStats(int64_t* loops, int64_t* handed) {
  *loops = qwen2_jax_cpu::Lingerers().loops.load();
  *handed = qwen2_jax_cpu::Lingerers().handed.load();
}

// How long a helper lingers, in us (for `cpu_kernels_module.cc`).
int64_t Qwen2JaxLingerUs() { return qwen2_jax_cpu::LingerNs() / 1000; }

// The instruction set the kernels run (for `cpu_kernels_module.cc`).
const char* Qwen2JaxIsa() { return IsaName(BestIsa()); }
