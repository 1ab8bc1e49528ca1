// CPU kernels of fastshare_C::relu_dropout_fwd / relu_dropout_bwd: ReLU and dropout in one pass, with the
// dropout mask drawn from a counter-based hash (the specification is fastshare.ops.relu_dropout, whose
// reference functions these kernels match bit for bit).
//
// Random stream: element i (row-major index of x) has the 64-bit counter c = offset + i, split into
// hi = c >> 32 and lo = c mod 2^32; with fmix32 the 32-bit finaliser of MurmurHash3 (all arithmetic mod 2^32):
//   key = fmix32(seed + 0x9E3779B9 * (hi + 1))        (one per block of 2^32 counters)
//   h   = fmix32(fmix32(lo ^ key) + key)
//   keep = h >= t,  t = floor(p * 2^32)               (P(keep) = 1 - t / 2^32, within 2^-32 of 1 - p)
// Forward:  out = keep ? relu(x) * scale : 0,  scale = 1 / (1 - p),  relu(x) = x < 0 ? 0 : x (keeps NaN, -0)
//           mask = keep AND x > 0 (bool, one byte per element, saved for backward)
// Backward: dx = mask ? grad * scale : 0
// Products are computed in float for float32/bfloat16 data and in double for float64, and rounded once.
// The element ranges of at::parallel_for are independent (each element hashes its own counter), so the
// result is the same for any number of threads and in each instruction-set copy of the inner loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "simd_spans.h"

// Inner loops are multiversioned (simd_spans.h): the 32-bit multiplies of the hash vectorise (vpmulld) only
// where the ISA has them.

namespace fastshare {
namespace {

constexpr int64_t kGrain = 32768;          // elements per parallel task, at least
constexpr int64_t kBlock = int64_t(1) << 32;  // counters sharing one key

FASTSHARE_ALWAYS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// ---------------------------------------------------------------------------------------------------------
// Inner loops over n consecutive elements whose counters share the high word (key); a_t: float or double.
// Branch-free, so that GCC vectorises them in every clone: a dropped element is zeroed by AND-ing the bits of
// the rounded product with an all-zero mask (giving +0, also for inf or NaN inputs), a kept one passes as is.

// Unsigned integer of scalar_t's size.
template <typename scalar_t>
struct Bits;
template <>
struct Bits<float> {
  using type = uint32_t;
};
template <>
struct Bits<double> {
  using type = uint64_t;
};
template <>
struct Bits<c10::BFloat16> {
  using type = uint16_t;
};

template <typename scalar_t>
FASTSHARE_ALWAYS_INLINE void store_masked(scalar_t* dst, scalar_t value, typename Bits<scalar_t>::type keep) {
  typename Bits<scalar_t>::type bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= keep;
  std::memcpy(dst, &bits, sizeof(bits));
}

template <typename scalar_t, typename a_t>
FASTSHARE_ALWAYS_INLINE void fwd_span(const scalar_t* x, scalar_t* out, uint8_t* mask, int64_t n, uint32_t lo,
                                      uint32_t key, uint32_t threshold, a_t scale) {
  using bits_t = typename Bits<scalar_t>::type;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = fmix32(fmix32((lo + static_cast<uint32_t>(i)) ^ key) + key);
    const bits_t keep = h >= threshold ? static_cast<bits_t>(~bits_t(0)) : bits_t(0);
    const a_t v = static_cast<a_t>(x[i]);
    const a_t relu = v < a_t(0) ? a_t(0) : v;
    store_masked(out + i, static_cast<scalar_t>(relu * scale), keep);
    mask[i] = static_cast<uint8_t>(keep & static_cast<bits_t>(v > a_t(0)));
  }
}

template <typename scalar_t, typename a_t>
FASTSHARE_ALWAYS_INLINE void bwd_span(const scalar_t* grad, const uint8_t* mask, scalar_t* dx, int64_t n,
                                      a_t scale) {
  using bits_t = typename Bits<scalar_t>::type;
  for (int64_t i = 0; i < n; ++i) {
    const bits_t keep = static_cast<bits_t>(bits_t(0) - static_cast<bits_t>(mask[i] != 0));
    store_masked(dx + i, static_cast<scalar_t>(static_cast<a_t>(grad[i]) * scale), keep);
  }
}

// One multiversioned entry point per dtype (target_clones needs plain functions).
#define FASTSHARE_DEFINE_SPANS(scalar_t, a_t, suffix)                                                          \
  FASTSHARE_SIMD_CLONES void fwd_span_##suffix(const scalar_t* x, scalar_t* out, uint8_t* mask, int64_t n,    \
                                               uint32_t lo, uint32_t key, uint32_t threshold, a_t scale) {    \
    fwd_span<scalar_t, a_t>(x, out, mask, n, lo, key, threshold, scale);                                       \
  }                                                                                                            \
  FASTSHARE_SIMD_CLONES void bwd_span_##suffix(const scalar_t* grad, const uint8_t* mask, scalar_t* dx,       \
                                               int64_t n, a_t scale) {                                         \
    bwd_span<scalar_t, a_t>(grad, mask, dx, n, scale);                                                         \
  }

FASTSHARE_DEFINE_SPANS(float, float, f32)
FASTSHARE_DEFINE_SPANS(double, double, f64)
FASTSHARE_DEFINE_SPANS(c10::BFloat16, float, bf16)
#undef FASTSHARE_DEFINE_SPANS

FASTSHARE_SPAN_TABLE()

// ---------------------------------------------------------------------------------------------------------
// Argument checks.

void check_data(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16, op, ": the CPU kernel supports float32, ",
              "float64 and bfloat16 ", name, ", got ", s);
}

void check_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
}

// ---------------------------------------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor> relu_dropout_fwd_cpu(const at::Tensor& x, const at::Tensor& seed, int64_t offset,
                                                        double p) {
  constexpr const char* op = "fastshare_C::relu_dropout_fwd";
  check_data(op, "x", x);
  check_p(op, p);
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " of shape ", seed.sizes(),
              " on ", seed.device());
  const int64_t seed_value = seed.item<int64_t>();
  TORCH_CHECK(seed_value >= 0 && seed_value <= int64_t(0xFFFFFFFF), op, ": seed must be in [0, 2^32), got ",
              seed_value);
  const int64_t numel = x.numel();
  TORCH_CHECK(offset >= 0 && (numel == 0 || offset <= std::numeric_limits<int64_t>::max() - (numel - 1)), op,
              ": offset must be >= 0 with the last counter offset + numel - 1 < 2^63, got offset ", offset, " for ",
              numel, " elements");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const uint32_t seed32 = static_cast<uint32_t>(seed_value);
  // floor(p 2^32) < 2^32 for p < 1 (the scaling by a power of two is exact).
  const uint32_t threshold = static_cast<uint32_t>(std::floor(p * 4294967296.0));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "relu_dropout_fwd_cpu", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    uint8_t* maskp = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      // [begin, end) cut where the counter's high word changes: one key per span.
      for (int64_t i = begin; i < end;) {
        const int64_t c = offset + i;
        const uint32_t hi = static_cast<uint32_t>(c >> 32);
        const int64_t stop = std::min(end, i + (kBlock - (c & (kBlock - 1))));
        const uint32_t key = fmix32(seed32 + 0x9E3779B9u * (hi + 1u));
        Spans<scalar_t>::fwd(xp + i, outp + i, maskp + i, stop - i, static_cast<uint32_t>(c), key, threshold,
                             static_cast<a_t>(scale));
        i = stop;
      }
    });
  });
  return {out, mask};
}

at::Tensor relu_dropout_bwd_cpu(const at::Tensor& grad, const at::Tensor& mask, double p) {
  constexpr const char* op = "fastshare_C::relu_dropout_bwd";
  check_data(op, "grad", grad);
  check_p(op, p);
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool, op, ": mask must be a bool CPU tensor, got ",
              mask.scalar_type(), " on ", mask.device());
  TORCH_CHECK(mask.sizes() == grad.sizes(), op, ": mask must have grad's shape ", grad.sizes(), ", got ",
              mask.sizes());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor mc = mask.contiguous();
  at::Tensor dx = at::empty(grad.sizes(), grad.options());
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "relu_dropout_bwd_cpu", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(mc.const_data_ptr<bool>());
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      Spans<scalar_t>::bwd(gp + begin, mp + begin, dxp + begin, end - begin, static_cast<a_t>(scale));
    });
  });
  return dx;
}

}  // namespace
}  // namespace fastshare

TORCH_LIBRARY_IMPL(fastshare_C, CPU, m) {
  m.impl("relu_dropout_fwd", &fastshare::relu_dropout_fwd_cpu);
  m.impl("relu_dropout_bwd", &fastshare::relu_dropout_bwd_cpu);
}
