// Launchers of the CUDA kernels of fastshare_C::gated_residual_{fwd,bwd}: plain C++ (no torch), shared by
// gated_residual_kernels.cu (nvcc) and gated_residual_cuda.cpp (host compiler, torch bindings).
//
// Data: f, r, grad, out, df, dr are flat arrays of `numel` elements = N rows x row_len (the binding checks
// the layout); segment s covers elements [seg[s] * row_len, seg[s+1] * row_len). All pointers are device
// pointers; nothing here reads device memory on the host, so the launches can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastshare {
namespace cuda {

enum class DataType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Most segments a launch takes: the per-segment offsets, gates and sums live in shared memory.
constexpr int kMaxSegments = 1024;

// The gate's inputs: y[s] = softmax((alpha[s] + G) / tau), G = -log(-log u[s]).
struct GateArgs {
  const void* alpha;       // (S, 2), float32 or float64 (alpha_is_double), strides in elements below
  const void* u;           // (S, 2), alpha's dtype
  int64_t alpha_stride0, alpha_stride1, u_stride0, u_stride1;
  bool alpha_is_double;
  const int64_t* seg;      // (S + 1,) row offsets, device memory
  int num_segments;        // S, 1 .. kMaxSegments
  double tau;
  bool hard;               // forward gate (and df, dr) one-hot argmax of y, ties to column 0
};

struct FwdArgs {
  const void* f;
  const void* r;
  void* out;
  int64_t numel;
  int64_t row_len;
  DataType dtype;
  GateArgs gate;
};

struct BwdArgs {
  const void* grad;
  const void* f;
  const void* r;
  void* df;
  void* dr;
  void* dalpha;            // (S, 2) contiguous, alpha's dtype
  int64_t numel;
  int64_t row_len;
  DataType dtype;
  GateArgs gate;
  bool deterministic;      // fixed-order gate-gradient sums (no float atomics)
  void* zeroed_workspace;  // bwd_zeroed_workspace_bytes(S), zero-filled before the launch
  void* partials;          // bwd_partials_bytes(numel, num_sms, S, deterministic), any content
};

// Workspace sizes of launch_gated_residual_bwd (bytes).
size_t bwd_zeroed_workspace_bytes(int num_segments);
size_t bwd_partials_bytes(int64_t numel, int num_sms, int num_segments, bool deterministic);

// out = g0 * relu(r + f) + g1 * r. Returns the launch's error code (cudaSuccess if fine).
cudaError_t launch_gated_residual_fwd(const FwdArgs& args, int num_sms, cudaStream_t stream);

// df, dr and dalpha in one launch. Returns the launch's error code (cudaSuccess if fine).
cudaError_t launch_gated_residual_bwd(const BwdArgs& args, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastshare
