// CPU kernels of fastshare_C::gated_residual_fwd / gated_residual_bwd (maths in csrc/extension.cpp).
//
// f, r, grad are read as a flat array of N rows x row_len elements (layout checked by
// check_gated_residual_args); segment s covers the elements [seg[s] * row_len, seg[s+1] * row_len).
// Both kernels make one pass over the data, in parallel over element ranges (at::parallel_for) that are cut
// at segment boundaries, so that each inner loop runs with one constant gate (g0, g1) and vectorises.
//
// Determinism of the backward's gate-gradient sums: every segment is cut into fixed chunks of kChunk
// elements starting at the segment's first element; each chunk is summed by one thread in kLanes
// interleaved lanes combined in a fixed order, and the chunk sums are added in chunk order. Neither the
// number of threads nor the instruction set of the clone that runs (see FASTSHARE_SIMD_CLONES) changes a
// single rounding, so the result is bitwise reproducible for any torch.get_num_threads().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../gated_residual_common.h"
#include "simd_spans.h"

namespace fastshare {
namespace {

constexpr int64_t kChunk = 2048;      // elements per backward work unit (fixed: part of the summation order)
constexpr int kLanes = 16;            // interleaved partial sums inside a unit
constexpr int64_t kGrain = 32768;     // elements per parallel task, at least

// Gate of one segment: forward gate g (one-hot in hard mode) and soft gate y, both in double (exact copies
// of the values computed in alpha's precision).
struct SegmentGate {
  double g0, g1, y0, y1;
};

// y = softmax((alpha + G) / tau) over the two columns, G = -log(-log u), computed in p_t (alpha's dtype),
// in the order of operations of fastshare.reference._soft_gate.
template <typename p_t>
std::vector<SegmentGate> segment_gates(const at::Tensor& alpha, const at::Tensor& u, double tau, bool hard) {
  const int64_t num_segments = alpha.size(0);
  const auto a = alpha.accessor<p_t, 2>();
  const auto w = u.accessor<p_t, 2>();
  const p_t t = static_cast<p_t>(tau);
  std::vector<SegmentGate> gates(num_segments);
  for (int64_t s = 0; s < num_segments; ++s) {
    const p_t x0 = (a[s][0] + -std::log(-std::log(w[s][0]))) / t;
    const p_t x1 = (a[s][1] + -std::log(-std::log(w[s][1]))) / t;
    const p_t m = std::max(x0, x1);
    const p_t e0 = std::exp(x0 - m);
    const p_t e1 = std::exp(x1 - m);
    const p_t sum = e0 + e1;
    const p_t y0 = e0 / sum;
    const p_t y1 = e1 / sum;
    // Hard mode: one-hot argmax of y, ties to column 0 (execute), as the reference.
    const bool select = y0 >= y1;
    gates[s].y0 = y0;
    gates[s].y1 = y1;
    gates[s].g0 = hard ? (select ? 1.0 : 0.0) : static_cast<double>(y0);
    gates[s].g1 = hard ? (select ? 0.0 : 1.0) : static_cast<double>(y1);
  }
  return gates;
}

// Element offsets of the segments, off[s] = seg[s] * row_len, after checking that seg is a valid partition
// of the N rows (the kernels index memory with it).
std::vector<int64_t> segment_offsets(const at::Tensor& seg, const RowLayout& layout, const char* op) {
  const int64_t* s = seg.data_ptr<int64_t>();
  const int64_t num_segments = layout.num_segments;
  TORCH_CHECK(s[0] == 0 && s[num_segments] == layout.rows, op, ": seg must start at 0 and end at the number of rows ",
              layout.rows, ", got seg[0] = ", s[0], ", seg[-1] = ", s[num_segments]);
  std::vector<int64_t> off(num_segments + 1);
  for (int64_t i = 0; i <= num_segments; ++i) {
    TORCH_CHECK(i == 0 || s[i] >= s[i - 1], op, ": seg must be non-decreasing, got seg[", i - 1, "] = ", s[i - 1],
                " > seg[", i, "] = ", s[i]);
    off[i] = s[i] * layout.row_len;
  }
  return off;
}

// Index of the segment holding element e: the largest s with off[s] <= e (skips empty segments).
int64_t segment_of(const std::vector<int64_t>& off, int64_t e) {
  const auto it = std::upper_bound(off.begin(), off.end() - 1, e);
  return static_cast<int64_t>(it - off.begin()) - 1;
}

// ---------------------------------------------------------------------------------------------------------
// Inner loops over n elements of one segment; a_t: float (float32, bfloat16) or double (float64).

// out = g0 * relu(r + f) + g1 * r. relu keeps NaN (as torch.relu).
template <typename scalar_t, typename a_t>
FASTSHARE_ALWAYS_INLINE void fwd_span(const scalar_t* f, const scalar_t* r, scalar_t* out, int64_t n, a_t g0,
                                      a_t g1) {
  for (int64_t i = 0; i < n; ++i) {
    const a_t rv = static_cast<a_t>(r[i]);
    const a_t s = rv + static_cast<a_t>(f[i]);
    const a_t relu = s < a_t(0) ? a_t(0) : s;
    out[i] = static_cast<scalar_t>(g0 * relu + g1 * rv);
  }
}

// One element of the backward: writes df[j], dr[j] and adds its terms of the two gate-gradient sums.
template <typename scalar_t, typename a_t>
FASTSHARE_ALWAYS_INLINE void bwd_element(const scalar_t* d, const scalar_t* f, const scalar_t* r, scalar_t* df,
                                         scalar_t* dr, int64_t j, a_t g0, a_t g1, a_t& acc0, a_t& acc1) {
  const a_t dv = static_cast<a_t>(d[j]);
  const a_t rv = static_cast<a_t>(r[j]);
  const a_t s = rv + static_cast<a_t>(f[j]);
  const a_t relu = s < a_t(0) ? a_t(0) : s;
  const a_t g0m = s > a_t(0) ? g0 : a_t(0);
  df[j] = static_cast<scalar_t>(g0m * dv);
  dr[j] = static_cast<scalar_t>((g0m + g1) * dv);
  acc0 += dv * relu;
  acc1 += dv * rv;
}

// df = g0 * m * d; dr = (g0 * m + g1) * d, m = [r + f > 0]; returns sum d * relu(r + f) and sum d * r
// over the n elements, each summed in kLanes interleaved lanes, lanes combined pairwise.
template <typename scalar_t, typename a_t>
FASTSHARE_ALWAYS_INLINE void bwd_span(const scalar_t* d, const scalar_t* f, const scalar_t* r, scalar_t* df,
                                      scalar_t* dr, int64_t n, a_t g0, a_t g1, a_t* sum0, a_t* sum1) {
  a_t acc0[kLanes] = {};
  a_t acc1[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      bwd_element(d, f, r, df, dr, i + l, g0, g1, acc0[l], acc1[l]);
    }
  }
  for (int l = 0; i + l < n; ++l) {
    bwd_element(d, f, r, df, dr, i + l, g0, g1, acc0[l], acc1[l]);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc0[l] += acc0[l + width];
      acc1[l] += acc1[l + width];
    }
  }
  *sum0 = acc0[0];
  *sum1 = acc1[0];
}

// One multiversioned entry point per dtype (target_clones needs plain functions).
#define FASTSHARE_DEFINE_SPANS(scalar_t, a_t, suffix)                                                           \
  FASTSHARE_SIMD_CLONES void fwd_span_##suffix(const scalar_t* f, const scalar_t* r, scalar_t* out, int64_t n,  \
                                               a_t g0, a_t g1) {                                                \
    fwd_span<scalar_t, a_t>(f, r, out, n, g0, g1);                                                              \
  }                                                                                                             \
  FASTSHARE_SIMD_CLONES void bwd_span_##suffix(const scalar_t* d, const scalar_t* f, const scalar_t* r,         \
                                               scalar_t* df, scalar_t* dr, int64_t n, a_t g0, a_t g1,           \
                                               a_t* sum0, a_t* sum1) {                                          \
    bwd_span<scalar_t, a_t>(d, f, r, df, dr, n, g0, g1, sum0, sum1);                                            \
  }

FASTSHARE_DEFINE_SPANS(float, float, f32)
FASTSHARE_DEFINE_SPANS(double, double, f64)
FASTSHARE_DEFINE_SPANS(c10::BFloat16, float, bf16)
#undef FASTSHARE_DEFINE_SPANS

FASTSHARE_SPAN_TABLE()

std::vector<SegmentGate> gates_for(const at::Tensor& alpha, const at::Tensor& u, double tau, bool hard) {
  return alpha.scalar_type() == at::kDouble ? segment_gates<double>(alpha, u, tau, hard)
                                            : segment_gates<float>(alpha, u, tau, hard);
}

void check_cpu_dtype(const char* op, const at::Tensor& f) {
  const auto t = f.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16, op,
              ": the CPU kernel supports float32, float64 and bfloat16 f/r, got ", t);
}

// ---------------------------------------------------------------------------------------------------------
// Ops.

at::Tensor gated_residual_fwd_cpu(const at::Tensor& f, const at::Tensor& r, const at::Tensor& alpha,
                                  const at::Tensor& u, double tau, bool hard, const at::Tensor& seg) {
  constexpr const char* op = "fastshare_C::gated_residual_fwd";
  const RowLayout layout = check_gated_residual_args(op, c10::DeviceType::CPU, f, r, alpha, u, tau, seg);
  check_cpu_dtype(op, f);
  const std::vector<int64_t> off = segment_offsets(seg, layout, op);
  const std::vector<SegmentGate> gates = gates_for(alpha, u, tau, hard);
  at::Tensor out = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, f.scalar_type(), "gated_residual_fwd_cpu", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, layout.numel, kGrain, [&](int64_t begin, int64_t end) {
      // [begin, end) cut at segment boundaries: one constant gate per span.
      for (int64_t i = begin, s = segment_of(off, begin); i < end; ++s) {
        const int64_t stop = std::min(end, off[s + 1]);
        Spans<scalar_t>::fwd(fp + i, rp + i, op_ + i, stop - i, static_cast<a_t>(gates[s].g0),
                             static_cast<a_t>(gates[s].g1));
        i = stop;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& grad, const at::Tensor& f,
                                                                      const at::Tensor& r, const at::Tensor& alpha,
                                                                      const at::Tensor& u, double tau, bool hard,
                                                                      const at::Tensor& seg, bool deterministic) {
  // `deterministic` is not needed: the CPU reduction is always deterministic (see the file comment).
  (void)deterministic;
  constexpr const char* op = "fastshare_C::gated_residual_bwd";
  const RowLayout layout = check_gated_residual_args(op, c10::DeviceType::CPU, f, r, alpha, u, tau, seg);
  check_gated_residual_grad(op, grad, f);
  check_cpu_dtype(op, f);
  const std::vector<int64_t> off = segment_offsets(seg, layout, op);
  const std::vector<SegmentGate> gates = gates_for(alpha, u, tau, hard);
  const int64_t num_segments = layout.num_segments;

  // Work units: segment s is cut into chunks of kChunk elements from its first element;
  // units unit_begin[s] .. unit_begin[s+1]-1 belong to segment s.
  std::vector<int64_t> unit_begin(num_segments + 1, 0);
  for (int64_t s = 0; s < num_segments; ++s) {
    unit_begin[s + 1] = unit_begin[s] + (off[s + 1] - off[s] + kChunk - 1) / kChunk;
  }
  const int64_t num_units = unit_begin[num_segments];
  std::vector<double> partial(2 * num_units);  // (sum d * relu(r + f), sum d * r) per unit

  at::Tensor df = at::empty_like(f);
  at::Tensor dr = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, f.scalar_type(), "gated_residual_bwd_cpu", [&] {
    using a_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = grad.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* dfp = df.mutable_data_ptr<scalar_t>();
    scalar_t* drp = dr.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, num_units, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t begin, int64_t end) {
      int64_t s = std::upper_bound(unit_begin.begin(), unit_begin.end() - 1, begin) - unit_begin.begin() - 1;
      for (int64_t unit = begin; unit < end; ++unit) {
        while (unit_begin[s + 1] <= unit) {
          ++s;
        }
        const int64_t lo = off[s] + (unit - unit_begin[s]) * kChunk;
        const int64_t n = std::min(kChunk, off[s + 1] - lo);
        a_t sum0, sum1;
        Spans<scalar_t>::bwd(dp + lo, fp + lo, rp + lo, dfp + lo, drp + lo, n, static_cast<a_t>(gates[s].g0),
                             static_cast<a_t>(gates[s].g1), &sum0, &sum1);
        partial[2 * unit] = sum0;
        partial[2 * unit + 1] = sum1;
      }
    });
  });

  // dg per segment (units in order), then dalpha = (dg - <y, dg>) * y / tau with the soft y.
  at::Tensor dalpha64 = at::empty({num_segments, 2}, alpha.options().dtype(at::kDouble));
  double* da = dalpha64.data_ptr<double>();
  for (int64_t s = 0; s < num_segments; ++s) {
    double dg0 = 0.0, dg1 = 0.0;
    for (int64_t unit = unit_begin[s]; unit < unit_begin[s + 1]; ++unit) {
      dg0 += partial[2 * unit];
      dg1 += partial[2 * unit + 1];
    }
    // y0 * y1 * (dg0 - dg1) / tau: (dg0 - <y, dg>) * y0 / tau without its cancellation (y0 + y1 = 1).
    da[2 * s] = gates[s].y0 * gates[s].y1 * (dg0 - dg1) / tau;
    da[2 * s + 1] = -da[2 * s];
  }
  return {df, dr, dalpha64.to(alpha.scalar_type())};
}

}  // namespace
}  // namespace fastshare

TORCH_LIBRARY_IMPL(fastshare_C, CPU, m) {
  m.impl("gated_residual_fwd", &fastshare::gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &fastshare::gated_residual_bwd_cpu);
}
