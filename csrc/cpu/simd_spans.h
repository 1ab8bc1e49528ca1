// Shared by the CPU kernels (gated_residual_cpu.cpp, relu_dropout_cpu.cpp): function multiversioning of
// their inner loops and the per-dtype table of those loops' entry points.
//
// Inner loops are built for AVX-512, AVX2 and the baseline ISA and picked at load time (GCC/Clang function
// multiversioning), since torch extensions compile for the baseline x86-64 ISA. setup.py compiles with
// -std=c++17, under which GCC contracts no a * b + c into an FMA, so every clone rounds identically.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSHARE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSHARE_SIMD_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTSHARE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTSHARE_ALWAYS_INLINE inline
#endif

// Spans<scalar_t>::fwd / ::bwd: the multiversioned entry points fwd_span_<suffix> / bwd_span_<suffix> for
// float (f32), double (f64) and c10::BFloat16 (bf16). Expand once, after those functions, in their namespace.
#define FASTSHARE_SPAN_TABLE()                            \
  template <typename scalar_t>                            \
  struct Spans;                                           \
  template <>                                             \
  struct Spans<float> {                                   \
    static constexpr auto fwd = fwd_span_f32;             \
    static constexpr auto bwd = bwd_span_f32;             \
  };                                                      \
  template <>                                             \
  struct Spans<double> {                                  \
    static constexpr auto fwd = fwd_span_f64;             \
    static constexpr auto bwd = bwd_span_f64;             \
  };                                                      \
  template <>                                             \
  struct Spans<c10::BFloat16> {                           \
    static constexpr auto fwd = fwd_span_bf16;            \
    static constexpr auto bwd = bwd_span_bf16;            \
  };
