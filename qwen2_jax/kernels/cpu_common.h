// What the CPU kernels (`cpu_matmul.cc`, `cpu_attention.cc`, `cpu_logits.cc`) share: the
// instruction set chosen at run time, a parallel loop over XLA's intra-op threads, and 16-lane
// float vectors (GCC / Clang vector extensions, lowered to whatever the including function's
// target has: one AVX-512 register, two AVX2 ones, four SSE ones; every helper is always
// inlined, so each kernel compiled for several targets gets its own copy).

#ifndef QWEN2_JAX_KERNELS_CPU_COMMON_H_
#define QWEN2_JAX_KERNELS_CPU_COMMON_H_

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

// The vectors are only passed between functions compiled for one target each (inlined).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace qwen2_jax_cpu {

// ------------------------------------------------------------------- instruction set, threads

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest of the kernels' instruction sets this CPU and OS support, from cpuid and xgetbv
// (not __builtin_cpu_supports, which some toolchains' runtimes leave unset: zig's Clang
// answered 0 for everything on an AVX-512 CPU).
inline Isa DetectIsa() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kGeneric;
  const bool fma = c & bit_FMA;
  if (!(c & bit_OSXSAVE) || !(c & bit_AVX)) return Isa::kGeneric;
  unsigned xcr0, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0 & 0x6) != 0x6) return Isa::kGeneric;  // the OS saves XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::kGeneric;
  const bool avx512 = (b & bit_AVX512F) && (b & bit_AVX512VL) && (b & bit_AVX512BW) &&
                      (b & bit_AVX512DQ) && (xcr0 & 0xE0) == 0xE0;  // and opmask / ZMM state
  if (avx512 && fma) return Isa::kAvx512;
  if ((b & bit_AVX2) && fma) return Isa::kAvx2;
  return Isa::kGeneric;
}

// The kernels' instruction set: DetectIsa(), or a narrower one named by QWEN2_JAX_CPU_ISA
// ("avx2", "generic"), read once: the tests run every build on one CPU that way. A name this
// CPU cannot run, or an unknown one, leaves DetectIsa()'s (`cpu_extension.module()` refuses
// unknown names before any kernel runs).
inline Isa BestIsa() {
  static const Isa isa = [] {
    const Isa best = DetectIsa();
    const char* want = std::getenv("QWEN2_JAX_CPU_ISA");
    if (want == nullptr) return best;
    const std::string name(want);
    const Isa asked = name == "generic" ? Isa::kGeneric
                      : name == "avx2"  ? Isa::kAvx2
                                        : Isa::kAvx512;
    return std::min(asked, best);
  }();
  return isa;
}

// Compilers that know the AMX intrinsics (GCC 11, Clang 12); built with an older one, the bf16x3
// matmul has only its portable loop.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define QWEN2_JAX_HAVE_AMX 1
#else
#define QWEN2_JAX_HAVE_AMX 0
#endif

// Whether the bf16x3 matmul can use AMX: it was compiled in (QWEN2_JAX_HAVE_AMX); the CPU has
// AMX-TILE, AMX-BF16 and AVX512-BF16; the OS saves the tile state (XCR0 bits 17, 18) and grants
// this process the tile data (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), Linux 5.16+);
// and QWEN2_JAX_CPU_ISA is unset or "amx" (any narrower build name turns AMX off). Asked once
// per process.
inline bool AmxUsable() {
  static const bool usable = [] {
    if (!QWEN2_JAX_HAVE_AMX) return false;
    const char* want = std::getenv("QWEN2_JAX_CPU_ISA");
    if (want != nullptr && std::string(want) != "amx") return false;
    if (BestIsa() != Isa::kAvx512) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tiles = (d & (1u << 24)) && (d & (1u << 22));  // AMX-TILE, AMX-BF16
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = a & (1u << 5);
    unsigned xcr0, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    if (!tiles || !avx512_bf16 || (xcr0 & 0x60000) != 0x60000) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

inline const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// The one of a kernel's builds (function pointers) for BestIsa().
template <typename Fn>
Fn ForBestIsa(Fn avx512, Fn avx2, Fn generic) {
  switch (BestIsa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return generic;
  }
}

// Helpers that linger. Waking a parked thread of XLA's pool took about 35 us per parallel loop
// on a 2-vCPU VM, and a decode step runs about 120 loops, tens to hundreds of us apart. So a
// helper that has done its share of one loop spins up to LingerNs() on `version` for the next
// loop of the process, and a loop that finds helpers lingering queues itself with the number
// it wants (`posted`, `tickets`) instead of scheduling pool tasks; concurrent loops are served
// oldest first. QWEN2_JAX_CPU_LINGER_US (read once; default 200, 0 turns it off) bounds the
// spin. The state is allocated once and never freed, so a helper still lingering while the
// process exits touches live memory.
struct LoopTask {
  virtual ~LoopTask() = default;
  virtual void Work() = 0;
};

struct Lingering {
  std::mutex mu;
  // Under mu: loops handed over, each with the helpers it still waits for (oldest first), and
  // the lingering helpers that no loop has claimed. Lingering helpers = idle + tickets.
  std::deque<std::pair<std::shared_ptr<LoopTask>, int64_t>> posted;
  int64_t idle = 0;
  // Written under mu, read by the spinning helpers: the sum of posted's counts, and a counter
  // bumped at every hand-over (on their own cache line, away from the lock and the counters).
  alignas(64) std::atomic<int64_t> tickets{0};
  std::atomic<int64_t> version{0};
  alignas(64) std::atomic<int64_t> loops{0}, handed{0};  // loops, and those handed over
};

inline Lingering& Lingerers() {
  static Lingering* state = new Lingering;
  return *state;
}

inline int64_t LingerNs() {
  static const int64_t ns = [] {
    const char* want = std::getenv("QWEN2_JAX_CPU_LINGER_US");
    if (want == nullptr || *want == '\0') return int64_t{200'000};
    char* end = nullptr;
    const long long us = std::strtoll(want, &end, 10);
    // The Python side refuses other values before any kernel runs; here they mean the default.
    if (*end != '\0' || us < 0 || us > 1'000'000) return int64_t{200'000};
    return static_cast<int64_t>(us) * 1000;
  }();
  return ns;
}

inline int64_t MonotonicNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A helper's life: its loop's work, then lingering for the next loop, until none comes in time.
inline void Help(std::shared_ptr<LoopTask> task) {
  Lingering& l = Lingerers();
  for (;;) {
    task->Work();
    task.reset();
    if (LingerNs() == 0) return;
    int64_t seen;
    {
      std::lock_guard<std::mutex> lock(l.mu);
      ++l.idle;
      seen = l.version.load(std::memory_order_relaxed);
    }
    const int64_t deadline = MonotonicNs() + LingerNs();
    for (int64_t spin = 0;; ++spin) {
      const int64_t version = l.version.load(std::memory_order_acquire);
      const bool posted = version != seen && l.tickets.load(std::memory_order_relaxed) > 0;
      seen = version;
      const bool late = !posted && spin % 64 == 0 && MonotonicNs() > deadline;
      if (posted || late) {
        std::lock_guard<std::mutex> lock(l.mu);
        // Whichever lingering helper sees a ticket takes it: the oldest loop still waiting.
        if (l.tickets.load(std::memory_order_relaxed) > 0) {
          auto& oldest = l.posted.front();
          task = oldest.first;
          if (--oldest.second == 0) l.posted.pop_front();
          l.tickets.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
        if (late) {
          --l.idle;
          return;
        }
      }
      _mm_pause();
    }
  }
}

// fn(i) for i in [0, n), claimed one at a time by the caller and up to num_threads - 1 helpers
// (lingering ones first, then tasks of XLA's intra-op pool); returns when all are done. The
// state is held by shared_ptr and every index is claimed before fn runs, so a helper that
// arrives after the caller has returned finds nothing left and touches nothing but the state
// (fn may refer to the caller's stack). The caller never waits for a helper to arrive.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State final : LoopTask {
    Fn fn;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    State(Fn f, int64_t count) : fn(std::move(f)), n(count) {}
    void Work() override {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  if (n <= 0) return;
  auto state = std::make_shared<State>(std::move(fn), n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  int64_t handed = 0;
  if (helpers > 0) {
    Lingering& l = Lingerers();
    std::lock_guard<std::mutex> lock(l.mu);
    l.loops.fetch_add(1, std::memory_order_relaxed);
    handed = std::min(l.idle, helpers);
    if (handed > 0) {
      l.idle -= handed;
      l.posted.emplace_back(state, handed);
      l.tickets.fetch_add(handed, std::memory_order_relaxed);
      l.handed.fetch_add(1, std::memory_order_relaxed);
      l.version.fetch_add(1, std::memory_order_release);
    }
  }
  for (int64_t i = handed; i < helpers; ++i) {
    std::shared_ptr<LoopTask> task = state;
    pool.Schedule([task] { Help(task); });
  }
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ------------------------------------------------------------------------------ 16-lane vectors

// Unaligned loads and stores go through the aligned(4) type.
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef float F16u __attribute__((vector_size(64), aligned(4)));
#define QWEN2_JAX_INLINE inline __attribute__((always_inline))

QWEN2_JAX_INLINE F16 Load(const float* p) { return *reinterpret_cast<const F16u*>(p); }
QWEN2_JAX_INLINE void Store(float* p, F16 v) { *reinterpret_cast<F16u*>(p) = v; }

// exp(x) for x <= 0 by range reduction and a degree-6 polynomial (relative error ~2e-7).
// Inputs below -87 give exp(-87) (~1.6e-38).
QWEN2_JAX_INLINE F16 ExpNonPositive(F16 x) {
  x = x < -87.0f ? F16{} - 87.0f : x;
  const F16 n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const F16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;   // |r| <= ln 2 / 2
  F16 p = F16{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;  // 2^n, n >= -126
  return p * reinterpret_cast<F16>(bits);
}

// 16 lane indices f(0, b) ... f(15, b) of a shuffle of two vectors: index l < 16 takes lane l
// of the first, 16 + l lane l of the second. Clang's __builtin_shufflevector takes them as
// constant arguments (GCC has it only from 12); GCC's __builtin_shuffle as a vector.
#define QWEN2_JAX_LANES(f, b)                                                                \
  f(0, b), f(1, b), f(2, b), f(3, b), f(4, b), f(5, b), f(6, b), f(7, b), f(8, b), f(9, b),  \
      f(10, b), f(11, b), f(12, b), f(13, b), f(14, b), f(15, b)
#if defined(__clang__)
#define QWEN2_JAX_SHUFFLE(x, y, f, b) __builtin_shufflevector(x, y, QWEN2_JAX_LANES(f, b))
#else
#define QWEN2_JAX_SHUFFLE(x, y, f, b) __builtin_shuffle(x, y, I16{QWEN2_JAX_LANES(f, b)})
#endif

constexpr int Swap(int l, int b) { return l ^ b; }  // lane l <- lane l ^ b

QWEN2_JAX_INLINE float Max16(F16 v) {  // horizontal max, by halving
  F16 w = QWEN2_JAX_SHUFFLE(v, v, Swap, 8);
  v = v > w ? v : w;
  w = QWEN2_JAX_SHUFFLE(v, v, Swap, 4);
  v = v > w ? v : w;
  w = QWEN2_JAX_SHUFFLE(v, v, Swap, 2);
  v = v > w ? v : w;
  w = QWEN2_JAX_SHUFFLE(v, v, Swap, 1);
  v = v > w ? v : w;
  return v[0];
}

QWEN2_JAX_INLINE float Sum16(F16 v) {  // horizontal sum, by halving
  v += QWEN2_JAX_SHUFFLE(v, v, Swap, 8);
  v += QWEN2_JAX_SHUFFLE(v, v, Swap, 4);
  v += QWEN2_JAX_SHUFFLE(v, v, Swap, 2);
  v += QWEN2_JAX_SHUFFLE(v, v, Swap, 1);
  return v[0];
}

}  // namespace qwen2_jax_cpu

#endif  // QWEN2_JAX_KERNELS_CPU_COMMON_H_
