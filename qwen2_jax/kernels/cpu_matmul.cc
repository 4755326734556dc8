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

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The panel width of this CPU's register kernel (for `cpu_kernels_module.cc`).
int Qwen2JaxPanelWidth() {
  switch (BestIsa()) {
    case Isa::kAvx512: return 32;
    case Isa::kAvx2: return 16;
    default: return 0;
  }
}

// The instruction set the kernels run (for `cpu_kernels_module.cc`).
const char* Qwen2JaxIsa() { return IsaName(BestIsa()); }
