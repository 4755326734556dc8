// Ragged paged attention for XLA:CPU, as an XLA FFI custom call: one continuous-batching step's
// queries (one-token decodes and prompt chunks, concatenated) against a paged KV cache, with the
// step's own keys / values read from k_new / v_new (so the pools may be written after the layer;
// with k_new / v_new of length 0 every key comes from the pools).
//
// Why by hand: in plain jnp (`ragged_paged_attention_blocked`) XLA:CPU gathers every block of
// pages into a temporary, masks and reduces it in separate passes, and the loop's bookkeeping
// costs more than the arithmetic; that was 32 ms of a 152 ms Qwen2-0.5B 16-row decode step.
// Here each (query block, kv head) walks its keys once, 16 at a time, from the pool pages.
//
// Shapes and masking are those of `ragged_paged_attention.py` (its module docstring): query t of
// sequence i sits at p = kv_lens[i] - q_len_i + t and sees keys j <= p with p - j < window (the
// caller passes INT32_MAX for no window; a window <= 0 sees nothing, as in the jnp reference).
// Online softmax in f32. Rows of padding tokens, and rows that see no key, are 0.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace qwen2_jax_cpu;  // NOLINT: the shared helpers

constexpr int64_t kTile = 16;        // keys per tile
constexpr int64_t kBlockQ = 16;      // query tokens per item
constexpr int64_t kRowGroup = 4;     // query rows whose scores share each load of the keys
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Step {
  const float* q;                      // [T, H, D]
  const float *k_pages, *v_pages;      // [P, K, ps, D]
  const float *k_new, *v_new;          // [T, K, D]
  const int32_t *kv_lens, *table, *cu;  // [S], [S, pps], [S + 1]
  float* out;                          // [T, H, D]
  int64_t h, kh, g, d, ps, pages, pps, window;
  bool has_new;  // k_new / v_new hold the step's keys (else the pools hold every key)
  float scale;
};

struct Item {
  int64_t seq, tok, n;  // queries: tokens [tok, tok + n) of sequence seq
};

// Swaps the off-diagonal b x b blocks of each 2b x 2b block of a 16 x 16 tile (rows x[i]); after
// b = 8, 4, 2, 1 the tile is transposed. Two-source shuffles (vpermt2ps on AVX-512).
// Lane l of the two results: from x[i] (index l) or x[i + b] (index 16 + l).
constexpr int LowLane(int l, int b) { return (l & b) ? 16 + l - b : l; }
constexpr int HighLane(int l, int b) { return (l & b) ? 16 + l : l + b; }

template <int B>
QWEN2_JAX_INLINE void TransposeStage(F16* x) {
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const F16 lo = QWEN2_JAX_SHUFFLE(x[i], x[i + B], LowLane, B);
    const F16 hi = QWEN2_JAX_SHUFFLE(x[i], x[i + B], HighLane, B);
    x[i] = lo;
    x[i + B] = hi;
  }
}

// kt[e * 16 + c] = key c's entry e, for e < d (keys c >= nk are 0).
QWEN2_JAX_INLINE void TransposeKeys(const float* const* krow, int64_t nk, int64_t d,
                                    float* kt) {
  const int64_t d16 = d / 16 * 16;
  for (int64_t e0 = 0; e0 < d16; e0 += 16) {
    F16 x[16];
    for (int64_t c = 0; c < 16; ++c) x[c] = c < nk ? Load(krow[c] + e0) : F16{};
    TransposeStage<8>(x);
    TransposeStage<4>(x);
    TransposeStage<2>(x);
    TransposeStage<1>(x);
    for (int64_t e = 0; e < 16; ++e) Store(kt + (e0 + e) * kTile, x[e]);
  }
  for (int64_t e = d16; e < d; ++e) {
    F16 col = {};
    for (int64_t c = 0; c < nk; ++c) col[c] = krow[c][e];
    Store(kt + e * kTile, col);
  }
}

// acc[r] += sum_c p[r][c] * v[c] for `rows` (<= 4) rows, one 64-wide slice [e0, e0 + 64) of D.
template <int R>
QWEN2_JAX_INLINE void AccumulateSlice(const F16* p, const float* const* vrow, int64_t nk,
                                      int64_t e0, float* acc, int64_t d) {
  F16 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) a[r][k] = Load(acc + r * d + e0 + 16 * k);
  for (int64_t c = 0; c < nk; ++c) {
    F16 v[4];
    for (int k = 0; k < 4; ++k) v[k] = Load(vrow[c] + e0 + 16 * k);
    for (int r = 0; r < R; ++r) {
      const float pc = p[r][c];
      for (int k = 0; k < 4; ++k) a[r][k] += pc * v[k];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) Store(acc + r * d + e0 + 16 * k, a[r][k]);
}

// acc[r] += sum_c p[r][c] * v[c] for rows [0, rows). Every key of a tile is a position of the
// sequence (written, finite), so a row's p = 0 for a key it does not see adds exactly 0.
QWEN2_JAX_INLINE void Accumulate(const F16* p, const float* const* vrow, int64_t nk,
                                 int64_t rows, float* acc, int64_t d) {
  const int64_t d64 = d / 64 * 64;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t rb = std::min<int64_t>(4, rows - r0);
    for (int64_t e0 = 0; e0 < d64; e0 += 64) {
      switch (rb) {
        case 4: AccumulateSlice<4>(p + r0, vrow, nk, e0, acc + r0 * d, d); break;
        case 3: AccumulateSlice<3>(p + r0, vrow, nk, e0, acc + r0 * d, d); break;
        case 2: AccumulateSlice<2>(p + r0, vrow, nk, e0, acc + r0 * d, d); break;
        default: AccumulateSlice<1>(p + r0, vrow, nk, e0, acc + r0 * d, d);
      }
    }
    for (int64_t r = r0; r < r0 + rb; ++r)
      for (int64_t c = 0; c < nk; ++c)
        for (int64_t e = d64; e < d; ++e) acc[r * d + e] += p[r][c] * vrow[c][e];
  }
}

// Scores of R query rows (q [R, D]) against a transposed tile kt [D, 16]: out[r][c] = q_r . k_c.
template <int R>
QWEN2_JAX_INLINE void Scores(const float* q, int64_t d, const float* kt, F16* out) {
  F16 a[R][2] = {};  // two chains per row
  int64_t e = 0;
  for (; e + 2 <= d; e += 2) {
    const F16 k0 = Load(kt + e * kTile), k1 = Load(kt + (e + 1) * kTile);
    for (int r = 0; r < R; ++r) {
      a[r][0] += q[r * d + e] * k0;
      a[r][1] += q[r * d + e + 1] * k1;
    }
  }
  for (; e < d; ++e) {
    const F16 k0 = Load(kt + e * kTile);
    for (int r = 0; r < R; ++r) a[r][0] += q[r * d + e] * k0;
  }
  for (int r = 0; r < R; ++r) out[r] = a[r][0] + a[r][1];
}

// One item's queries against one kv head. scratch: at least Scratch(st) floats.
int64_t Scratch(const Step& st) {
  return kBlockQ * st.g * (2 * st.d + 2 + kTile) + st.d * kTile + 16;
}

QWEN2_JAX_INLINE void AttendBody(const Step& st, const Item& it, int64_t head, float* scratch) {
  const int64_t d = st.d, g = st.g, rows = it.n * g;
  const int64_t q_len = st.cu[it.seq + 1] - st.cu[it.seq];
  const int64_t new_from = st.kv_lens[it.seq] - q_len;  // first position held by k_new / v_new
  const int64_t first = new_from + (it.tok - st.cu[it.seq]);  // position of the first query
  // 64-byte aligned scratch (the F16 tiles of p).
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t{63};
  float* base = reinterpret_cast<float*>(aligned);
  F16* p = reinterpret_cast<F16*>(base);  // [rows] this tile's softmax numerators
  float* qs = base + rows * kTile;        // [rows, D] scaled queries
  float* acc = qs + rows * d;             // [rows, D]
  float* run_max = acc + rows * d;        // [rows]
  float* run_sum = run_max + rows;        // [rows]
  float* kt = run_sum + rows;             // [D, kTile] the tile's keys, transposed
  for (int64_t i = 0; i < it.n; ++i) {
    const float* src = st.q + ((it.tok + i) * st.h + head * g) * d;  // g heads, contiguous
    for (int64_t e = 0; e < g * d; ++e) qs[i * g * d + e] = src[e] * st.scale;
  }
  std::fill(acc, acc + rows * d, 0.0f);
  std::fill(run_max, run_max + rows, kNegInf);
  std::fill(run_sum, run_sum + rows, 0.0f);
  const int64_t last = first + it.n - 1;
  const int64_t lo = std::max<int64_t>(0, first - st.window + 1);
  const int32_t* pages = st.table + it.seq * st.pps;
  I16 lane;
  for (int c = 0; c < 16; ++c) lane[c] = c;
  const int64_t d16 = d / 16 * 16;
  const float* krow[kTile];
  const float* vrow[kTile];
  for (int64_t j0 = lo; j0 <= last; j0 += kTile) {
    const int64_t nk = std::min(kTile, last + 1 - j0);
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t j = j0 + c;
      if (st.has_new && j >= new_from) {
        const int64_t at = (st.cu[it.seq] + (j - new_from)) * st.kh + head;
        krow[c] = st.k_new + at * d;
        vrow[c] = st.v_new + at * d;
      } else {
        // A table entry out of range would be a caller's bug: clamped, never read outside.
        const int64_t page = std::clamp<int64_t>(pages[j / st.ps], 0, st.pages - 1);
        const int64_t at = (page * st.kh + head) * st.ps + j % st.ps;
        krow[c] = st.k_pages + at * d;
        vrow[c] = st.v_pages + at * d;
      }
    }
    TransposeKeys(krow, nk, d, kt);
    if (j0 + kTile <= last) {  // the next tile's pool rows, while this one is computed
      const int64_t j = j0 + kTile;
      if (!(st.has_new && j >= new_from)) {
        const int64_t page = std::clamp<int64_t>(pages[j / st.ps], 0, st.pages - 1);
        const int64_t at = (page * st.kh + head) * st.ps + j % st.ps;
        const int64_t n = std::min<int64_t>(kTile, st.ps - j % st.ps) * d;  // same page
        for (int64_t e = 0; e < n; e += 16) {
          __builtin_prefetch(st.k_pages + at * d + e);
          __builtin_prefetch(st.v_pages + at * d + e);
        }
      }
    }
    const I16 key = lane + static_cast<int32_t>(j0);
    for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
      const int64_t rg = std::min<int64_t>(kRowGroup, rows - r0);
      F16 sc[kRowGroup];
      switch (rg) {
        case 4: Scores<4>(qs + r0 * d, d, kt, sc); break;
        case 3: Scores<3>(qs + r0 * d, d, kt, sc); break;
        case 2: Scores<2>(qs + r0 * d, d, kt, sc); break;
        default: Scores<1>(qs + r0 * d, d, kt, sc);
      }
      for (int64_t r = r0; r < r0 + rg; ++r) {
        const int64_t pos = first + r / g;
        const bool any = st.window > 0 && j0 <= pos && j0 + nk - 1 > pos - st.window;
        if (!any) {  // no key of this tile is visible to the row
          p[r] = F16{};
          continue;
        }
        I16 seen = (lane < static_cast<int32_t>(nk)) & (key <= static_cast<int32_t>(pos));
        seen &= key > static_cast<int32_t>(std::max<int64_t>(pos - st.window, -1));
        const F16 s = seen ? sc[r - r0] : F16{} + kNegInf;
        const float m = std::max(run_max[r], Max16(s));  // finite: the tile has a visible key
        const float rescale =
            run_max[r] == kNegInf ? 0.0f : ExpNonPositive(F16{} + (run_max[r] - m))[0];
        p[r] = seen ? ExpNonPositive(s - m) : F16{};
        run_max[r] = m;
        run_sum[r] = run_sum[r] * rescale + Sum16(p[r]);
        float* ar = acc + r * d;
        for (int64_t e = 0; e < d16; e += 16) Store(ar + e, Load(ar + e) * rescale);
        for (int64_t e = d16; e < d; ++e) ar[e] *= rescale;
      }
    }
    Accumulate(p, vrow, nk, rows, acc, d);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / g, qh = head * g + r % g;
    float* dst = st.out + ((it.tok + i) * st.h + qh) * d;
    const float inv = run_sum[r] > 0.0f ? 1.0f / run_sum[r] : 0.0f;
    for (int64_t e = 0; e < d; ++e) dst[e] = acc[r * d + e] * inv;
  }
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
void Attend512(const Step& st, const Item& it, int64_t head, float* scratch) {
  AttendBody(st, it, head, scratch);
}

__attribute__((target("avx2,fma"))) void Attend256(const Step& st, const Item& it, int64_t head,
                                                   float* scratch) {
  AttendBody(st, it, head, scratch);
}

void AttendGeneric(const Step& st, const Item& it, int64_t head, float* scratch) {
  AttendBody(st, it, head, scratch);
}

using AttendFn = void (*)(const Step&, const Item&, int64_t, float*);

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k_pages, ffi::Buffer<ffi::F32> v_pages,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> table,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                          ffi::Buffer<ffi::S32> window, ffi::Buffer<ffi::F32> k_new,
                          ffi::Buffer<ffi::F32> v_new, ffi::ResultBuffer<ffi::F32> out,
                          float scale) {
  const auto qd = q.dimensions(), pd = k_pages.dimensions(), td = table.dimensions(),
             nd = k_new.dimensions();
  const bool same = v_pages.dimensions() == pd && v_new.dimensions() == nd &&
                    out->dimensions() == qd;
  if (!same || qd.size() != 3 || pd.size() != 4 || td.size() != 2 || nd.size() != 3 ||
      static_cast<int64_t>(kv_lens.element_count()) != td[0] ||
      static_cast<int64_t>(cu_q_lens.element_count()) != td[0] + 1 ||
      num_seqs.element_count() != 1 || window.element_count() != 1 ||
      (nd[0] != qd[0] && nd[0] != 0) || nd[1] != pd[1] || nd[2] != qd[2] || pd[3] != qd[2] ||
      pd[1] == 0 || pd[2] == 0 || qd[1] % pd[1] != 0)
    return ffi::Error::InvalidArgument(
        "paged_attention_cpu: q [T, H, D], pools [P, K, ps, D], kv_lens [S], table [S, pps], "
        "cu_q_lens [S + 1], num_seqs [1], window [1], k_new / v_new [T or 0, K, D]");
  Step st;
  const int64_t t = qd[0], s = td[0];
  st.h = qd[1];
  st.d = qd[2];
  st.pages = pd[0];
  st.kh = pd[1];
  st.ps = pd[2];
  st.g = st.h / st.kh;
  st.pps = td[1];
  st.window = window.typed_data()[0];
  st.has_new = nd[0] > 0;
  st.scale = scale;
  st.q = q.typed_data();
  st.k_pages = k_pages.typed_data();
  st.v_pages = v_pages.typed_data();
  st.k_new = k_new.typed_data();
  st.v_new = v_new.typed_data();
  st.kv_lens = kv_lens.typed_data();
  st.table = table.typed_data();
  st.cu = cu_q_lens.typed_data();
  st.out = out->typed_data();
  const int64_t live = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, s);
  std::vector<Item> items;
  const int64_t begin = live > 0 ? st.cu[0] : 0;
  int64_t end = begin;  // tokens [begin, end) belong to live sequences
  if (begin < 0 || begin > t)
    return ffi::Error::InvalidArgument("paged_attention_cpu: cu_q_lens out of order or range");
  for (int64_t i = 0; i < live; ++i) {
    const int64_t a = st.cu[i], b = st.cu[i + 1];
    // Malformed metadata (queries outside [0, T], more queries than cached tokens, a table too
    // narrow for the keys read from the pools) is refused rather than read out of bounds.
    if (a < end || b < a || b > t)
      return ffi::Error::InvalidArgument("paged_attention_cpu: cu_q_lens out of order or range");
    const int64_t from_pool = st.kv_lens[i] - (st.has_new ? b - a : 0);
    if (b > a && (st.kv_lens[i] < b - a || (from_pool > 0 && (from_pool - 1) / st.ps >= st.pps)))
      return ffi::Error::InvalidArgument("paged_attention_cpu: kv_lens do not fit the queries "
                                         "or the page table");
    for (int64_t tok = a; tok < b; tok += kBlockQ)
      items.push_back({i, tok, std::min(kBlockQ, b - tok)});
    end = b;
  }
  if (st.d == 0 || st.h == 0) return ffi::Error::Success();
  std::fill(st.out, st.out + begin * st.h * st.d, 0.0f);
  std::fill(st.out + end * st.h * st.d, st.out + t * st.h * st.d, 0.0f);
  const AttendFn attend = ForBestIsa<AttendFn>(&Attend512, &Attend256, &AttendGeneric);
  const int64_t scratch_floats = Scratch(st);
  ParallelFor(pool, static_cast<int64_t>(items.size()) * st.kh, [&](int64_t u) {
    thread_local std::vector<float> scratch;  // per thread, reused across calls
    if (static_cast<int64_t>(scratch.size()) < scratch_floats) scratch.resize(scratch_floats);
    attend(st, items[u / st.kh], u % st.kh, scratch.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Qwen2JaxPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pages
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // window
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
