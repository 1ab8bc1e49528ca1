// CUDA implementations of fastshare_C::gated_residual_{fwd,bwd}: argument checks, allocation and the
// current stream; the kernels are in gated_residual_kernels.cu (plain CUDA C++, launched through the
// functions of gated_residual_kernels.h). Compiled by the host compiler in CUDA builds only.
//
// Nothing here reads device memory or synchronises, so both ops can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../gated_residual_common.h"
#include "gated_residual_kernels.h"

namespace fastshare {
namespace {

cuda::DataType cuda_data_type(const char* op, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float16 and bfloat16 f/r, got ", t);
  return t == at::kFloat ? cuda::DataType::kFloat32
                         : (t == at::kHalf ? cuda::DataType::kFloat16 : cuda::DataType::kBFloat16);
}

cuda::GateArgs gate_args(const char* op, const at::Tensor& alpha, const at::Tensor& u, double tau, bool hard,
                         const at::Tensor& seg, int64_t num_segments) {
  TORCH_CHECK(num_segments <= cuda::kMaxSegments, op, ": the CUDA kernel takes at most ", cuda::kMaxSegments,
              " segments (alpha.size(0)), got ", num_segments);
  cuda::GateArgs g;
  g.alpha = alpha.const_data_ptr();
  g.u = u.const_data_ptr();
  g.alpha_stride0 = alpha.stride(0);
  g.alpha_stride1 = alpha.stride(1);
  g.u_stride0 = u.stride(0);
  g.u_stride1 = u.stride(1);
  g.alpha_is_double = alpha.scalar_type() == at::kDouble;
  g.seg = seg.const_data_ptr<int64_t>();
  g.num_segments = static_cast<int>(num_segments);
  g.tau = tau;
  g.hard = hard;
  return g;
}

void check_cuda(const char* op, const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorString(err));
}

// Multiprocessors of the current device (sizes the grids).
int num_sms(const char* op) {
  int device = 0;
  int sms = 0;
  check_cuda(op, "cudaGetDevice", cudaGetDevice(&device));
  check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

at::Tensor gated_residual_fwd_cuda(const at::Tensor& f, const at::Tensor& r, const at::Tensor& alpha,
                                   const at::Tensor& u, double tau, bool hard, const at::Tensor& seg) {
  constexpr const char* op = "fastshare_C::gated_residual_fwd";
  const RowLayout layout = check_gated_residual_args(op, c10::DeviceType::CUDA, f, r, alpha, u, tau, seg);
  const cuda::DataType dtype = cuda_data_type(op, f.scalar_type());
  const c10::cuda::CUDAGuard device_guard(f.device());
  at::Tensor out = at::empty_like(f);
  if (layout.numel == 0) {
    return out;
  }
  cuda::FwdArgs args;
  args.f = f.const_data_ptr();
  args.r = r.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.numel = layout.numel;
  args.row_len = layout.row_len;
  args.dtype = dtype;
  args.gate = gate_args(op, alpha, u, tau, hard, seg, layout.num_segments);
  check_cuda(op, "kernel launch",
             cuda::launch_gated_residual_fwd(args, num_sms(op), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_residual_bwd_cuda(const at::Tensor& grad, const at::Tensor& f,
                                                                       const at::Tensor& r, const at::Tensor& alpha,
                                                                       const at::Tensor& u, double tau, bool hard,
                                                                       const at::Tensor& seg, bool deterministic) {
  constexpr const char* op = "fastshare_C::gated_residual_bwd";
  const RowLayout layout = check_gated_residual_args(op, c10::DeviceType::CUDA, f, r, alpha, u, tau, seg);
  check_gated_residual_grad(op, grad, f);
  const cuda::DataType dtype = cuda_data_type(op, f.scalar_type());
  const c10::cuda::CUDAGuard device_guard(f.device());
  at::Tensor df = at::empty_like(f);
  at::Tensor dr = at::empty_like(r);
  if (layout.num_segments == 0) {
    return {df, dr, at::empty({0, 2}, alpha.options())};
  }
  at::Tensor dalpha = at::empty({layout.num_segments, 2}, alpha.options());
  const int sms = num_sms(op);
  const int num_segments = static_cast<int>(layout.num_segments);
  // The ticket counter and the atomic sums must start at zero; the per-block partial sums need not.
  const at::Tensor zeroed = at::zeros({static_cast<int64_t>(cuda::bwd_zeroed_workspace_bytes(num_segments))},
                                      f.options().dtype(at::kByte));
  const at::Tensor partials = at::empty(
      {static_cast<int64_t>(cuda::bwd_partials_bytes(layout.numel, sms, num_segments, deterministic))},
      f.options().dtype(at::kByte));

  cuda::BwdArgs args;
  args.grad = grad.const_data_ptr();
  args.f = f.const_data_ptr();
  args.r = r.const_data_ptr();
  args.df = df.mutable_data_ptr();
  args.dr = dr.mutable_data_ptr();
  args.dalpha = dalpha.mutable_data_ptr();
  args.numel = layout.numel;
  args.row_len = layout.row_len;
  args.dtype = dtype;
  args.gate = gate_args(op, alpha, u, tau, hard, seg, layout.num_segments);
  args.deterministic = deterministic;
  args.zeroed_workspace = zeroed.data_ptr();
  args.partials = partials.data_ptr();
  check_cuda(op, "kernel launch", cuda::launch_gated_residual_bwd(args, sms, c10::cuda::getCurrentCUDAStream().stream()));
  return {df, dr, dalpha};
}

}  // namespace
}  // namespace fastshare

TORCH_LIBRARY_IMPL(fastshare_C, CUDA, m) {
  m.impl("gated_residual_fwd", &fastshare::gated_residual_fwd_cuda);
  m.impl("gated_residual_bwd", &fastshare::gated_residual_bwd_cuda);
}
