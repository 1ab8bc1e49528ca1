// CUDA kernels of fastshare_C::gated_residual_{fwd,bwd}. Plain CUDA C++ (no torch headers), so that nvcc
// can compile-check it on a machine without a CUDA build of torch (.ci/nvcc_check.sh).
//
// Maths, per element of segment s (elements [seg[s] * row_len, seg[s+1] * row_len) of the flat arrays):
//   y = softmax((alpha[s] + G) / tau), G = -log(-log u[s]);  g = one-hot argmax of y (hard, ties to 0) or y
//   forward:  out = g0 * relu(r + f) + g1 * r
//   backward: df = g0 * m * d;  dr = (g0 * m + g1) * d,  m = [r + f > 0]
//             dg0[s] = sum_s d * relu(r + f);  dg1[s] = sum_s d * r
//             dalpha[s] = (dg - <y, dg>) * y / tau   (soft y in both modes)
//
// Work decomposition. A tile is kThreads x VEC x kUnroll consecutive elements; thread t of a block handles
// the VEC-element vectors t, t + kThreads, ... of the tile (coalesced 16-byte accesses, kUnroll independent
// vectors per tensor in flight; VEC = 1 where a pointer is not 16-byte aligned). Each block first builds, in shared memory, the element offset of every
// segment (seg[s] * row_len: no per-element division) and every segment's gate, computed in double from
// alpha, u and tau (double log/exp keep full accuracy under --use_fast_math). A vector inside one segment
// uses one gate; a vector straddling a segment boundary looks the gate up per element.
//   forward:  grid-stride loop over tiles; a per-thread segment cursor only moves forward.
//   backward: each block owns one contiguous span of tiles, so it meets few segment boundaries; per-thread
//             partial sums of dg stay in registers and are block-reduced (fixed-order tree) into a
//             per-segment shared sum only when the block crosses into another segment. The last block to
//             finish (atomic ticket counter, zeroed by the caller) reduces the blocks' sums and writes
//             dalpha: the whole backward is one launch.
//             deterministic: per-block sums are stored and summed in block order, in double.
//             fast:          per-block sums are added with float atomics (order varies between runs).
// seg is read only on the device (no host sync; graph-capturable); offsets are clamped to [0, numel], so
// an invalid seg gives wrong gates but never an out-of-bounds access.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gated_residual_kernels.h"

namespace fastshare {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 4;   // resident blocks per SM the launch bounds allow (<= 64 registers)
// Elements per tensor per thread per tile with 16-byte vectors, whatever the dtype (so the float working
// set, and the registers, are the same): forward 16 (float32: 2 x 4 16-byte loads in flight, 16-bit types
// 2 x 2), backward 8 (float32: 3 x 2, 16-bit types 3 x 1). The unaligned fallback (VEC = 1) takes 4.
constexpr int kFwdElems = 16;
constexpr int kBwdElems = 8;
constexpr int kScalarElems = 4;
constexpr int64_t kFwdTile = int64_t(kThreads) * kFwdElems;  // sizes the grids
constexpr int64_t kBwdTile = int64_t(kThreads) * kBwdElems;

// ---------------------------------------------------------------------------------------------------------
// Element types: arithmetic in float.

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC elements moved as one access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Pack at element e; elements at or past numel read as 0 (they contribute nothing to the sums).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int64_t e, int64_t numel) {
  Pack<T, VEC> x;
  if (e + VEC <= numel) {
    x = *reinterpret_cast<const Pack<T, VEC>*>(p + e);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      x.v[k] = e + k < numel ? p[e + k] : from_float<T>(0.f);
    }
  }
  return x;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t e, int64_t numel, const Pack<T, VEC>& x) {
  if (e + VEC <= numel) {
    *reinterpret_cast<Pack<T, VEC>*>(p + e) = x;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (e + k < numel) {
        p[e + k] = x.v[k];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Gates and segments.

// Soft gate of segment s in double, rounded to alpha's precision (as the reference's gate).
__device__ void soft_gate(const GateArgs& g, int s, double* y0, double* y1) {
  double a0, a1, u0, u1;
  if (g.alpha_is_double) {
    const double* a = static_cast<const double*>(g.alpha);
    const double* u = static_cast<const double*>(g.u);
    a0 = a[s * g.alpha_stride0];
    a1 = a[s * g.alpha_stride0 + g.alpha_stride1];
    u0 = u[s * g.u_stride0];
    u1 = u[s * g.u_stride0 + g.u_stride1];
  } else {
    const float* a = static_cast<const float*>(g.alpha);
    const float* u = static_cast<const float*>(g.u);
    a0 = a[s * g.alpha_stride0];
    a1 = a[s * g.alpha_stride0 + g.alpha_stride1];
    u0 = u[s * g.u_stride0];
    u1 = u[s * g.u_stride0 + g.u_stride1];
  }
  const double x0 = (a0 + -log(-log(u0))) / g.tau;
  const double x1 = (a1 + -log(-log(u1))) / g.tau;
  const double m = fmax(x0, x1);
  const double e0 = exp(x0 - m);
  const double e1 = exp(x1 - m);
  *y0 = e0 / (e0 + e1);
  *y1 = e1 / (e0 + e1);
  if (!g.alpha_is_double) {
    *y0 = static_cast<float>(*y0);
    *y1 = static_cast<float>(*y1);
  }
}

// Shared-memory tables: off[0..S] element offsets (clamped to [0, numel]), gate[0..S-1] forward gates.
__device__ void build_segment_tables(const GateArgs& g, int64_t row_len, int64_t numel, int64_t* off,
                                     float2* gate) {
  const int num_segments = g.num_segments;
  for (int s = threadIdx.x; s <= num_segments; s += blockDim.x) {
    const int64_t v = g.seg[s] * row_len;
    off[s] = v < 0 ? 0 : (v > numel ? numel : v);
  }
  for (int s = threadIdx.x; s < num_segments; s += blockDim.x) {
    double y0, y1;
    soft_gate(g, s, &y0, &y1);
    if (g.hard) {
      gate[s] = y0 >= y1 ? make_float2(1.f, 0.f) : make_float2(0.f, 1.f);
    } else {
      gate[s] = make_float2(static_cast<float>(y0), static_cast<float>(y1));
    }
  }
  __syncthreads();
}

// Segment of element e: the largest s in [0, S-1] with off[s] <= e (empty segments are skipped).
__device__ __forceinline__ int find_segment(const int64_t* off, int num_segments, int64_t e) {
  int lo = 0;
  int hi = num_segments - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (off[mid] <= e) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Segment of element e >= off[s] given the segment s of an earlier element (cursor moves forward only).
__device__ __forceinline__ int advance_segment(const int64_t* off, int num_segments, int s, int64_t e) {
  return (s + 1 < num_segments && off[s + 1] <= e) ? find_segment(off, num_segments, e) : s;
}

// Whether the VEC elements from e (in segment s) all lie in segment s.
__device__ __forceinline__ bool vector_in_segment(const int64_t* off, int num_segments, int s, int64_t e, int vec) {
  return s + 1 >= num_segments || e + vec <= off[s + 1];
}

// ---------------------------------------------------------------------------------------------------------
// Element maths.

template <typename T>
__device__ __forceinline__ T fwd_element(T f, T r, float2 g) {
  const float rv = to_float(r);
  const float s = rv + to_float(f);
  const float relu = s < 0.f ? 0.f : s;  // keeps NaN, as torch.relu
  return from_float<T>(g.x * relu + g.y * rv);
}

// df = g0 * m * d, dr = (g0 * m + g1) * d of one element, m = [r + f > 0].
template <typename T>
__device__ __forceinline__ void bwd_element(T d, T f, T r, float2 g, T* df, T* dr) {
  const float dv = to_float(d);
  const float g0m = to_float(r) + to_float(f) > 0.f ? g.x : 0.f;
  *df = from_float<T>(g0m * dv);
  *dr = from_float<T>((g0m + g.y) * dv);
}

// Adds one element's terms of the gate gradient: d * relu(r + f) to acc0, d * r to acc1.
template <typename T>
__device__ __forceinline__ void add_gate_grad_terms(T d, T f, T r, float* acc0, float* acc1) {
  const float dv = to_float(d);
  const float rv = to_float(r);
  const float s = rv + to_float(f);
  *acc0 += dv * (s < 0.f ? 0.f : s);
  *acc1 += dv * rv;
}

// Fixed butterfly: every lane ends with the warp's sum; same order every run.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// *target += block sum of (acc0, acc1), in a fixed order; resets acc. Called by all threads of the block.
__device__ __forceinline__ void block_flush(float* acc0, float* acc1, float2* target, float2* warp_sums) {
  const float v0 = warp_sum(*acc0);
  const float v1 = warp_sum(*acc1);
  if ((threadIdx.x & 31) == 0) {
    warp_sums[threadIdx.x >> 5] = make_float2(v0, v1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float2 t = *target;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      t.x += warp_sums[w].x;
      t.y += warp_sums[w].y;
    }
    *target = t;
  }
  __syncthreads();
  *acc0 = 0.f;
  *acc1 = 0.f;
}

// dalpha[s] = (dg - <y, dg>) * y / tau with the soft gate y, in double, stored in alpha's dtype.
__device__ void write_dalpha(const GateArgs& g, int s, double dg0, double dg1, void* dalpha) {
  double y0, y1;
  soft_gate(g, s, &y0, &y1);
  // (dg0 - <y, dg>) * y0 / tau without its cancellation at saturated gates (y0 + y1 = 1).
  const double d0 = y0 * y1 * (dg0 - dg1) / g.tau;
  const double d1 = -d0;
  if (g.alpha_is_double) {
    static_cast<double*>(dalpha)[2 * s] = d0;
    static_cast<double*>(dalpha)[2 * s + 1] = d1;
  } else {
    static_cast<float*>(dalpha)[2 * s] = static_cast<float>(d0);
    static_cast<float*>(dalpha)[2 * s + 1] = static_cast<float>(d1);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels. Dynamic shared memory: forward (S + 1) * 8 + S * 8 bytes, backward + S * 8 more.

size_t fwd_smem_bytes(int num_segments) { return (num_segments + 1) * sizeof(int64_t) + num_segments * sizeof(float2); }
size_t bwd_smem_bytes(int num_segments) { return fwd_smem_bytes(num_segments) + num_segments * sizeof(float2); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gated_residual_fwd_kernel(const T* __restrict__ f, const T* __restrict__ r, T* __restrict__ out,
                              int64_t numel, int64_t row_len, GateArgs g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int num_segments = g.num_segments;
  int64_t* off = reinterpret_cast<int64_t*>(smem);
  float2* gate = reinterpret_cast<float2*>(off + num_segments + 1);
  build_segment_tables(g, row_len, numel, off, gate);

  constexpr int kUnroll = VEC == 1 ? kScalarElems : kFwdElems / VEC;
  constexpr int64_t kTile = int64_t(kThreads) * VEC * kUnroll;
  const int64_t num_tiles = (numel + kTile - 1) / kTile;
  int s = 0;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t base = tile * kTile + int64_t(threadIdx.x) * VEC;
    Pack<T, VEC> fv[kUnroll], rv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      fv[u] = load_pack<T, VEC>(f, base + int64_t(u) * kThreads * VEC, numel);
      rv[u] = load_pack<T, VEC>(r, base + int64_t(u) * kThreads * VEC, numel);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(u) * kThreads * VEC;
      if (e < numel) {
        s = advance_segment(off, num_segments, s, e);
        if (vector_in_segment(off, num_segments, s, e, VEC)) {
          const float2 gs = gate[s];
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            o.v[k] = fwd_element(fv[u].v[k], rv[u].v[k], gs);
          }
          store_pack<T, VEC>(out, e, numel, o);
        } else {
          // The vector straddles a segment boundary (rare): per-element gates, data re-read from cache
          // (indexing the registers of the packs with a run-time k would put them in local memory).
#pragma unroll 1
          for (int k = 0; k < VEC; ++k) {
            const int64_t i = e + k;
            if (i < numel) {
              out[i] = fwd_element(f[i], r[i], gate[advance_segment(off, num_segments, s, i)]);
            }
          }
        }
      }
    }
  }
}

template <typename T, int VEC, bool kDeterministic>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gated_residual_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ f, const T* __restrict__ r,
                              T* __restrict__ df, T* __restrict__ dr, int64_t numel, int64_t row_len, GateArgs g,
                              void* dalpha, unsigned int* counter, float* dg_atomic, float2* partials) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float2 warp_sums[kWarps];
  __shared__ bool is_last_block;
  const int num_segments = g.num_segments;
  int64_t* off = reinterpret_cast<int64_t*>(smem);
  float2* gate = reinterpret_cast<float2*>(off + num_segments + 1);
  float2* seg_sum = gate + num_segments;  // this block's (dg0, dg1) per segment
  for (int s = threadIdx.x; s < num_segments; s += blockDim.x) {
    seg_sum[s] = make_float2(0.f, 0.f);
  }
  build_segment_tables(g, row_len, numel, off, gate);

  // This block's span of tiles: [tile_begin, tile_end).
  constexpr int kUnroll = VEC == 1 ? kScalarElems : kBwdElems / VEC;
  constexpr int64_t kTile = int64_t(kThreads) * VEC * kUnroll;
  const int64_t num_tiles = (numel + kTile - 1) / kTile;
  const int64_t per_block = (num_tiles + gridDim.x - 1) / gridDim.x;
  const int64_t tile_begin = blockIdx.x * per_block;
  const int64_t tile_end = tile_begin + per_block < num_tiles ? tile_begin + per_block : num_tiles;

  // cur: the segment that acc0/acc1 accumulate for (block-uniform).
  int cur = tile_begin < tile_end ? find_segment(off, num_segments, tile_begin * kTile) : 0;
  float acc0 = 0.f;
  float acc1 = 0.f;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t first = tile * kTile;
    const int64_t last = (first + kTile < numel ? first + kTile : numel) - 1;
    const int seg_first = advance_segment(off, num_segments, cur, first);
    if (seg_first != cur) {
      block_flush(&acc0, &acc1, seg_sum + cur, warp_sums);
      cur = seg_first;
    }
    const int seg_last = advance_segment(off, num_segments, seg_first, last);

    const int64_t base = first + int64_t(threadIdx.x) * VEC;
    if (seg_first == seg_last) {
      // The whole tile is in segment cur: one gate, sums stay in registers. All loads first.
      Pack<T, VEC> dv[kUnroll], fv[kUnroll], rv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = base + int64_t(u) * kThreads * VEC;
        dv[u] = load_pack<T, VEC>(grad, e, numel);
        fv[u] = load_pack<T, VEC>(f, e, numel);
        rv[u] = load_pack<T, VEC>(r, e, numel);
      }
      const float2 gs = gate[cur];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t e = base + int64_t(u) * kThreads * VEC;
        Pack<T, VEC> dfv, drv;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          bwd_element(dv[u].v[k], fv[u].v[k], rv[u].v[k], gs, &dfv.v[k], &drv.v[k]);
          add_gate_grad_terms(dv[u].v[k], fv[u].v[k], rv[u].v[k], &acc0, &acc1);
        }
        if (e < numel) {
          store_pack<T, VEC>(df, e, numel, dfv);
          store_pack<T, VEC>(dr, e, numel, drv);
        }
      }
    } else {
      // The tile straddles segment boundaries (rare: at most S - 1 tiles in all): for each of its segments
      // in order, the elements of that segment (scalar accesses: a short cold path that keeps the
      // registers of the fast path free), then one block reduction.
      for (int s = seg_first; s <= seg_last; ++s) {
        const int64_t lo = off[s];
        const int64_t hi = s + 1 < num_segments ? off[s + 1] : numel;
        const float2 gs = gate[s];
#pragma unroll 1
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll 1
          for (int k = 0; k < VEC; ++k) {
            const int64_t i = base + int64_t(u) * kThreads * VEC + k;
            if (i >= lo && i < hi && i < numel) {
              bwd_element(grad[i], f[i], r[i], gs, df + i, dr + i);
              add_gate_grad_terms(grad[i], f[i], r[i], &acc0, &acc1);
            }
          }
        }
        block_flush(&acc0, &acc1, seg_sum + s, warp_sums);
      }
      cur = seg_last;
    }
  }
  block_flush(&acc0, &acc1, seg_sum + cur, warp_sums);

  // Publish this block's sums, then take a ticket; the last block reduces everything and writes dalpha.
  for (int s = threadIdx.x; s < num_segments; s += blockDim.x) {
    const float2 v = seg_sum[s];
    if (kDeterministic) {
      partials[int64_t(blockIdx.x) * num_segments + s] = v;
    } else if (v.x != 0.f || v.y != 0.f) {
      atomicAdd(dg_atomic + 2 * s, v.x);
      atomicAdd(dg_atomic + 2 * s + 1, v.y);
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) {
    return;
  }
  __threadfence();
  if (kDeterministic) {
    // Warp w reduces segments w, w + kWarps, ...; lane l sums blocks l, l + 32, ... in order.
    const int lane = threadIdx.x & 31;
    for (int s = threadIdx.x >> 5; s < num_segments; s += kWarps) {
      double t0 = 0.0, t1 = 0.0;
      for (int b = lane; b < gridDim.x; b += 32) {
        const float2 v = __ldcg(partials + int64_t(b) * num_segments + s);
        t0 += v.x;
        t1 += v.y;
      }
      t0 = warp_sum(t0);
      t1 = warp_sum(t1);
      if (lane == 0) {
        write_dalpha(g, s, t0, t1, dalpha);
      }
    }
  } else {
    for (int s = threadIdx.x; s < num_segments; s += blockDim.x) {
      write_dalpha(g, s, __ldcg(dg_atomic + 2 * s), __ldcg(dg_atomic + 2 * s + 1), dalpha);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers.

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int bwd_grid(int64_t numel, int num_sms) {
  const int64_t want = ceil_div(numel, kBwdTile);
  const int64_t cap = int64_t(num_sms) * kBlocksPerSm;
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

template <typename T>
cudaError_t launch_fwd_typed(const FwdArgs& a, int num_sms, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* f = static_cast<const T*>(a.f);
  const T* r = static_cast<const T*>(a.r);
  T* out = static_cast<T*>(a.out);
  const size_t smem = fwd_smem_bytes(a.gate.num_segments);
  const int64_t tiles = ceil_div(a.numel, kFwdTile);
  const int64_t cap = int64_t(num_sms) * kBlocksPerSm;
  const int grid = static_cast<int>(tiles < cap ? tiles : cap);
  if (aligned16(f) && aligned16(r) && aligned16(out)) {
    gated_residual_fwd_kernel<T, kVec><<<grid, kThreads, smem, stream>>>(f, r, out, a.numel, a.row_len, a.gate);
  } else {
    gated_residual_fwd_kernel<T, 1><<<grid, kThreads, smem, stream>>>(f, r, out, a.numel, a.row_len, a.gate);
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
void launch_bwd_vec(const BwdArgs& a, int grid, cudaStream_t stream) {
  const size_t smem = bwd_smem_bytes(a.gate.num_segments);
  unsigned int* counter = static_cast<unsigned int*>(a.zeroed_workspace);
  float* dg_atomic = static_cast<float*>(a.zeroed_workspace) + 4;
  float2* partials = static_cast<float2*>(a.partials);
  const T* grad = static_cast<const T*>(a.grad);
  const T* f = static_cast<const T*>(a.f);
  const T* r = static_cast<const T*>(a.r);
  T* df = static_cast<T*>(a.df);
  T* dr = static_cast<T*>(a.dr);
  if (a.deterministic) {
    gated_residual_bwd_kernel<T, VEC, true><<<grid, kThreads, smem, stream>>>(
        grad, f, r, df, dr, a.numel, a.row_len, a.gate, a.dalpha, counter, dg_atomic, partials);
  } else {
    gated_residual_bwd_kernel<T, VEC, false><<<grid, kThreads, smem, stream>>>(
        grad, f, r, df, dr, a.numel, a.row_len, a.gate, a.dalpha, counter, dg_atomic, partials);
  }
}

template <typename T>
cudaError_t launch_bwd_typed(const BwdArgs& a, int num_sms, cudaStream_t stream) {
  const int grid = bwd_grid(a.numel, num_sms);
  if (aligned16(a.grad) && aligned16(a.f) && aligned16(a.r) && aligned16(a.df) && aligned16(a.dr)) {
    launch_bwd_vec<T, 16 / sizeof(T)>(a, grid, stream);
  } else {
    launch_bwd_vec<T, 1>(a, grid, stream);
  }
  return cudaGetLastError();
}

}  // namespace

size_t bwd_zeroed_workspace_bytes(int num_segments) {
  // [0, 16): the ticket counter (unsigned int); then 2 * S floats of atomically summed dg.
  return 16 + 2 * sizeof(float) * static_cast<size_t>(num_segments);
}

size_t bwd_partials_bytes(int64_t numel, int num_sms, int num_segments, bool deterministic) {
  return deterministic ? sizeof(float2) * static_cast<size_t>(bwd_grid(numel, num_sms)) * num_segments : 0;
}

cudaError_t launch_gated_residual_fwd(const FwdArgs& args, int num_sms, cudaStream_t stream) {
  switch (args.dtype) {
    case DataType::kFloat32:
      return launch_fwd_typed<float>(args, num_sms, stream);
    case DataType::kFloat16:
      return launch_fwd_typed<__half>(args, num_sms, stream);
    case DataType::kBFloat16:
      return launch_fwd_typed<__nv_bfloat16>(args, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gated_residual_bwd(const BwdArgs& args, int num_sms, cudaStream_t stream) {
  switch (args.dtype) {
    case DataType::kFloat32:
      return launch_bwd_typed<float>(args, num_sms, stream);
    case DataType::kFloat16:
      return launch_bwd_typed<__half>(args, num_sms, stream);
    case DataType::kBFloat16:
      return launch_bwd_typed<__nv_bfloat16>(args, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastshare
