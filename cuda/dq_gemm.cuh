// Host interface of cuda/dq_gemm.cu, free of torch: cuda/ops.cu (the torch binding) calls launch_dq_gemm.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "plan.h"

namespace compressor {

template <typename T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// One product y = x @ W.T (+ bias) on the tile layout (see dq_gemm.cu). Pointers are device pointers;
// perm, zeros and bias may be null. When plan.splits > 1: partials is an fp32 (splits, M, N) workspace and
// locks grid_x * grid_y ints, zero before the first launch; each launch leaves them zero again, so they are
// kept per device, and launches sharing them must be on one stream.
struct DqArgs {
  const void* x;             // (M, K) __half or __nv_bfloat16
  const int64_t* perm;       // (K,)
  const int32_t* qweight;    // (Nt, K / P, 32)
  const __half* scales;      // (Nt, G, 32)
  const __half* zeros;       // (Nt, G, 32)
  const void* bias;          // (N,) in x's dtype
  void* y;                   // (M, N) in x's dtype
  float* partials;
  int* locks;
  int M, K, N, group, bits;
  bool bf16;
};

cudaError_t launch_dq_gemm(const DqArgs& a, const Plan& plan, cudaStream_t stream);

}  // namespace compressor
