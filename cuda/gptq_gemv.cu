// Decode GEMV/GEMM for M <= 16 rows on the GPTQ checkpoint layout, read as it is stored.
//
//   out[m, n] = sum_k x[m, k] * (q[k, n] - zero[g(k), n]) * scale[g(k), n]      (fp32 accumulation)
//
// Layout (the auto-gptq v1 checkpoint, `compressor/quant/packing.py`; no repack needed for this kernel):
//   x        (M, K)            T = __half or __nv_bfloat16, row-major
//   qweight  (K * BITS / 32, N) int32: 32 / BITS codes of consecutive k per word, lowest bits first
//   qzeros   (G, ceil(N * BITS / 32)) int32: zero - 1 of 32 / BITS consecutive n per word, lowest bits first
//   scales   (G, N)            __half
//   g_idx    (K,)              int32, the group of each input channel (read only when ACT, act-order)
//   out_f32  (M, N)            float, zeroed by the caller: split-K partial sums are added atomically
//
// Why this shape of kernel: at M <= 16 the GEMV is bound by the bytes of qweight, so each thread
// streams one 128-bit word group (4 columns, VEC = 4) of a qweight row per step and dequantizes it in
// registers; the x chunk of the block sits in shared memory (read by all 128 threads). qweight rows
// are contiguous along N, so a warp reads 512 contiguous bytes per row: fully coalesced. A block covers
// 512 columns and K_CHUNK rows of K; gridDim.y splits K so that a 4096 x 4096 layer launches
// 8 x 32 = 256 blocks (enough to fill 108 SMs); the partial sums meet in `out_f32` by atomicAdd.
// Scale and zero are loaded once per group for static groups; with act-order (ACT) each k reads its
// own group's, which hit L1 since neighbouring k of one row share few groups.
// The GPTQ layout itself packs qzeros along N, so N is a multiple of 32 / BITS (8 for 4-bit): every
// qweight row offset is then a multiple of 4 words and the 128-bit loads are aligned (a VEC = 1 path
// would never run). Constraints (checked on the host, `compressor/kernels/cuda_plan.py`):
// K % (32 / BITS) == 0, N % (32 / BITS) == 0, K % group == 0 for static groups.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace compressor {

constexpr int THREADS = 128;
constexpr int K_CHUNK = 128;        // rows of K per block (multiple of 8 and of 4)

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int BITS, int M, int VEC, bool ACT>
__global__ void __launch_bounds__(THREADS)
gptq_gemv(const T* __restrict__ x, const int32_t* __restrict__ qweight, const int32_t* __restrict__ qzeros,
          const __half* __restrict__ scales, const int32_t* __restrict__ g_idx, float* __restrict__ out_f32,
          int K, int N, int group) {
  constexpr int PER = 32 / BITS;                 // codes per int32
  constexpr int MASK = (1 << BITS) - 1;
  __shared__ float xs[M][K_CHUNK];

  const int k0 = blockIdx.y * K_CHUNK;
  const int kn = min(K_CHUNK, K - k0);
  for (int i = threadIdx.x; i < M * K_CHUNK; i += THREADS) {
    const int m = i / K_CHUNK, k = i % K_CHUNK;
    xs[m][k] = k < kn ? to_f32(x[(size_t)m * K + k0 + k]) : 0.f;
  }
  __syncthreads();

  const int n0 = (blockIdx.x * THREADS + threadIdx.x) * VEC;
  if (n0 >= N) return;
  float acc[M][VEC];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[m][v] = 0.f;

  float s[VEC], z[VEC];
  int g_cur = -1;
  for (int kp = 0; kp < kn; kp += PER) {       // one qweight row: PER consecutive k
    int32_t w[VEC];
    const int32_t* row = qweight + (size_t)((k0 + kp) / PER) * N + n0;
    if constexpr (VEC == 4) {
      const int4 v4 = __ldg(reinterpret_cast<const int4*>(row));   // one 128-bit load: 4 columns
      w[0] = v4.x; w[1] = v4.y; w[2] = v4.z; w[3] = v4.w;
    } else {
      w[0] = __ldg(row);
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int k = k0 + kp + j;
      const int g = ACT ? __ldg(g_idx + k) : k / group;
      if (g != g_cur) {                          // scale and zero of this group, for the VEC columns
        g_cur = g;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const int n = n0 + v;
          s[v] = __half2float(scales[(size_t)g * N + n]);
          const int32_t zw = __ldg(qzeros + (size_t)g * ((N + PER - 1) / PER) + n / PER);
          z[v] = (float)(((zw >> (BITS * (n % PER))) & MASK) + 1);
        }
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float wv = ((float)((w[v] >> (BITS * j)) & MASK) - z[v]) * s[v];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m][v] = fmaf(xs[m][kp + j], wv, acc[m][v]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (n0 + v < N) atomicAdd(out_f32 + (size_t)m * N + n0 + v, acc[m][v]);
}

// out_f32 -> the activation dtype (the second, tiny launch of a GEMV).
template <typename T>
__global__ void __launch_bounds__(256) cast_out(const float* __restrict__ src, T* __restrict__ dst, int n);

template <>
__global__ void __launch_bounds__(256) cast_out<__half>(const float* __restrict__ src, __half* __restrict__ dst,
                                                         int n) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i < n) dst[i] = __float2half_rn(src[i]);
}

template <>
__global__ void __launch_bounds__(256) cast_out<__nv_bfloat16>(const float* __restrict__ src,
                                                                __nv_bfloat16* __restrict__ dst, int n) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

// Every instantiation the host dispatches to (and the compile check inspects): dtype x bits x rows x
// act-order, 40 kernels.
#define GEMV(T, B, M, V, A)                                                                                   \
  template __global__ void gptq_gemv<T, B, M, V, A>(const T*, const int32_t*, const int32_t*, const __half*, \
                                                   const int32_t*, float*, int, int, int);
#define GEMV_ROWS(T, B, V, A) GEMV(T, B, 1, V, A) GEMV(T, B, 2, V, A) GEMV(T, B, 4, V, A) GEMV(T, B, 8, V, A) \
  GEMV(T, B, 16, V, A)
#define GEMV_ALL(T, B) GEMV_ROWS(T, B, 4, false) GEMV_ROWS(T, B, 4, true)
GEMV_ALL(__half, 4)
GEMV_ALL(__half, 8)
GEMV_ALL(__nv_bfloat16, 4)
GEMV_ALL(__nv_bfloat16, 8)

}  // namespace compressor
