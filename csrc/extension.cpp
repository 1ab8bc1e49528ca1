// fastshare._C: the compiled extension. Importing it registers the torch ops of namespace `fastshare_C`;
// their CPU kernels live in csrc/cpu/, their CUDA kernels (CUDA builds only) in csrc/cuda/.
//
// Maths (DESIGN.md §2), per element of segment s (rows seg[s]:seg[s+1]):
//   y = softmax((alpha[s] + G) / tau), G = -log(-log u[s]);  g = one-hot argmax of y (hard) or y (soft)
//   out = g0 * relu(r + f) + g1 * r
//   df = g0 * m * d;  dr = (g0 * m + g1) * d,  m = [r + f > 0]
//   dg0[s] = sum_s d * relu(r + f);  dg1[s] = sum_s d * r;  dalpha[s] = (dg - <y, dg>) * y / tau (soft y)
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastshare_C, m) {
  // f, r: (N, ...) contiguous or channels_last, same layout; alpha, u: (S, 2) float32/float64;
  // seg: int64 (S + 1,) row offsets on f's device. Returns out with f's shape, dtype and layout.
  m.def("gated_residual_fwd(Tensor f, Tensor r, Tensor alpha, Tensor u, float tau, bool hard, Tensor seg)"
        " -> Tensor");
  // grad: upstream gradient with f's layout. Returns (df, dr, dalpha); dalpha is (S, 2) in alpha's dtype.
  // deterministic: run-to-run identical gate-logit gradients (the CPU kernel always is).
  m.def("gated_residual_bwd(Tensor grad, Tensor f, Tensor r, Tensor alpha, Tensor u, float tau, bool hard,"
        " Tensor seg, bool deterministic) -> (Tensor, Tensor, Tensor)");
  // ReLU + dropout in one pass (maths in csrc/cpu/relu_dropout_cpu.cpp): x any shape, read in row-major order;
  // seed: one-element int64 CPU tensor in [0, 2^32); offset >= 0; p in [0, 1). Returns contiguous
  // (out, mask): out = keep ? relu(x) / (1 - p) : 0 in x's dtype, mask = keep AND x > 0 (bool).
  m.def("relu_dropout_fwd(Tensor x, Tensor seed, int offset, float p) -> (Tensor, Tensor)");
  // dx = mask ? grad / (1 - p) : 0, contiguous, grad's shape and dtype.
  m.def("relu_dropout_bwd(Tensor grad, Tensor mask, float p) -> Tensor");
}

// The module itself is empty: the ops above are reached through torch.ops.fastshare_C.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
