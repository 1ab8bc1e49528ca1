// Argument checks shared by the CPU and CUDA implementations of fastshare_C::gated_residual_{fwd,bwd}.
//
// Both kernels read f, r (and grad) as one flat array of N rows of `row_len = numel / N` elements, element i
// belonging to row i / row_len. That is exact for memory that is dense with dim 0 outermost: contiguous, or
// channels_last for 4-D tensors. The Python layer (fastshare.ops.gated_residual) only passes such tensors;
// these checks make the ops refuse any other layout instead of silently misreading it.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace fastshare {

// Shape of the flat view: numel = rows * row_len; rows = N = f.size(0), row_len = 0 when N == 0.
struct RowLayout {
  int64_t numel;
  int64_t rows;
  int64_t row_len;
  int64_t num_segments;  // S = alpha.size(0)
};

// Dense memory with dim 0 outermost: contiguous, or channels_last for a 4-D tensor.
inline bool dense_rows(const at::Tensor& t) {
  return t.is_contiguous() || (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// Whether `a` and `b` (same shape) map to the same flat order: both contiguous or both channels_last.
// (Strides of size-1 dimensions may differ without changing the order.)
inline bool same_flat_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) {
    return true;
  }
  return a.dim() == 4 && a.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         b.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks f (N, ...), r, alpha (S, 2), u (S, 2), tau, seg (S + 1,) for `op` on `device_type`.
inline RowLayout check_gated_residual_args(const char* op, c10::DeviceType device_type, const at::Tensor& f,
                                           const at::Tensor& r, const at::Tensor& alpha, const at::Tensor& u,
                                           double tau, const at::Tensor& seg) {
  TORCH_CHECK(f.device().type() == device_type, op, ": f must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", f.device());
  TORCH_CHECK(f.dim() >= 1, op, ": f must have at least one dimension (rows), got a 0-d tensor");
  TORCH_CHECK(r.device() == f.device(), op, ": r must be on f's device ", f.device(), ", got ", r.device());
  TORCH_CHECK(r.sizes() == f.sizes(), op, ": r must have f's shape ", f.sizes(), ", got ", r.sizes());
  TORCH_CHECK(r.scalar_type() == f.scalar_type(), op, ": r must have f's dtype ", f.scalar_type(), ", got ",
              r.scalar_type());
  TORCH_CHECK(dense_rows(f), op, ": f must be contiguous or channels_last (4-D), got strides ", f.strides(),
              " for shape ", f.sizes());
  TORCH_CHECK(same_flat_layout(f, r), op, ": r must have f's memory layout (strides ", f.strides(), "), got ",
              r.strides());

  TORCH_CHECK(alpha.device() == f.device(), op, ": alpha must be on f's device ", f.device(), ", got ",
              alpha.device());
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(1) == 2, op, ": alpha must have shape (S, 2), got ", alpha.sizes());
  TORCH_CHECK(alpha.scalar_type() == at::kFloat || alpha.scalar_type() == at::kDouble, op,
              ": alpha must be float32 or float64, got ", alpha.scalar_type());
  TORCH_CHECK(u.device() == f.device(), op, ": u must be on f's device ", f.device(), ", got ", u.device());
  TORCH_CHECK(u.sizes() == alpha.sizes(), op, ": u must have alpha's shape ", alpha.sizes(), ", got ", u.sizes());
  TORCH_CHECK(u.scalar_type() == alpha.scalar_type(), op, ": u must have alpha's dtype ", alpha.scalar_type(),
              ", got ", u.scalar_type());
  TORCH_CHECK(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);

  const int64_t num_segments = alpha.size(0);
  TORCH_CHECK(seg.device() == f.device(), op, ": seg must be on f's device ", f.device(), ", got ", seg.device());
  TORCH_CHECK(seg.scalar_type() == at::kLong, op, ": seg must be int64, got ", seg.scalar_type());
  TORCH_CHECK(seg.dim() == 1 && seg.size(0) == num_segments + 1, op, ": seg must have shape (", num_segments + 1,
              ",) for ", num_segments, " segments, got ", seg.sizes());
  TORCH_CHECK(seg.is_contiguous(), op, ": seg must be contiguous");

  RowLayout layout;
  layout.numel = f.numel();
  layout.rows = f.size(0);
  layout.row_len = layout.rows > 0 ? layout.numel / layout.rows : 0;
  layout.num_segments = num_segments;
  TORCH_CHECK(num_segments > 0 || layout.rows == 0, op, ": alpha has no segments but f has ", layout.rows,
              " rows");
  return layout;
}

// grad (the upstream gradient of out) must be laid out exactly as f.
inline void check_gated_residual_grad(const char* op, const at::Tensor& grad, const at::Tensor& f) {
  TORCH_CHECK(grad.device() == f.device(), op, ": grad must be on f's device ", f.device(), ", got ",
              grad.device());
  TORCH_CHECK(grad.sizes() == f.sizes(), op, ": grad must have f's shape ", f.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == f.scalar_type(), op, ": grad must have f's dtype ", f.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(same_flat_layout(f, grad), op, ": grad must have f's memory layout (strides ", f.strides(),
              "), got ", grad.strides());
}

}  // namespace fastshare
