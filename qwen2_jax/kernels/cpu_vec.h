// 16-lane float vectors for the CPU kernels (`cpu_attention.cc`, `cpu_logits.cc`): GCC / Clang
// vector extensions, lowered to whatever the including function's target has (one AVX-512
// register, two AVX2 ones, four SSE ones). Every helper is always inlined, so each kernel
// compiled for several targets (function attributes, chosen at run time) gets its own copy.

#ifndef QWEN2_JAX_KERNELS_CPU_VEC_H_
#define QWEN2_JAX_KERNELS_CPU_VEC_H_

#include <cstdint>

// The vectors are only passed between functions compiled for one target each (inlined).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace qwen2_jax_cpu {

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

#endif  // QWEN2_JAX_KERNELS_CPU_VEC_H_
