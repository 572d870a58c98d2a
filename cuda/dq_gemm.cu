// Tensor-core dequant-matmul on the tile layout, for every M: decode (M <= 16) and prefill tiles.
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = round_T((q[n, k] - zero[n, g(k)]) * scale[n, g(k)])
//
// Layout: the tile layout every device's kernels read (compressor/kernels/ops.py, built at load by
// compressor/kernels/repack.py from the GPTQ checkpoint; no CUDA-specific repack). K = in_features,
// N = out_features, P = 32 / BITS codes per word, Nt = ceil(N / 32), G = K / group:
//   x        (M, K)          T = __half or __nv_bfloat16, row-major
//   perm     (K,)            int64 or null: act-order, the kernel reads x[m, perm[k]] (groups contiguous)
//   qweight  (Nt, K / P, 32) int32: word [t, w, c] = codes of k = P*w .. P*w+P-1 of column n = 32*t + c
//   scales   (Nt, G, 32)     __half, 0 in the padded columns n >= N
//   zeros    (Nt, G, 32)     __half integers, or null when symmetric (zero 2^(BITS-1))
// Why this layout suits a GPU as it is: one word row of a tile (32 columns) is 128 contiguous bytes, so a
// thread's 128-bit load takes 4 columns and 8 threads take a whole cache line; a block of BN = 128 columns
// streams 4 tiles, each a contiguous run of memory along K. N needs no alignment (tiles are padded).
//
// Each block computes a (BM, BN) tile of y over a range of K. gridDim.z splits K when the grid would be too
// small for the GPU: each split parks its fp32 sums in a workspace, and the last block of a tile to arrive
// (a counter per tile) adds them in split order, adds the bias and stores y, all in the one launch. With one
// split the block stores y itself. Per BK = 64 step:
//   1. the x tile (BM, BK) goes to shared memory, as 16-byte runs of 8 k (gathered through perm for
//      act-order);
//   2. each thread loads 128-bit runs of qweight (4 columns of one word row) and their scale and zero
//      point, dequantizes in registers with the fp16 magic-number trick (Marlin's: a code OR 0x6400 is the
//      half 1024 + q; subtracting 1024 + zero is exact, and one multiply by the scale rounds once, which is
//      exactly the reference's fp32 product rounded to fp16; for bf16, (q - zero) is widened and multiplied
//      in fp32, exact, then rounded once), and stores the 8 (4-bit) or 4 (8-bit) halves of a word as one
//      run along k of the column, in the order the trick yields them: slot s of a 4-bit word holds
//      k = {0,4,1,5,2,6,3,7}[s], of an 8-bit word k = {0,2,1,3}[s]. The x tile is stored in the same order,
//      so the dot products are unchanged;
//   3. WMMA 16x16x16 (mma.sync on sm_80/sm_90) multiplies the tiles with fp32 accumulators.
// The next step's global loads are issued before the current step's WMMA (register double buffering).
// Host side, launch plan and an emulation of this arithmetic: compressor/kernels/cuda_plan.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "dq_gemm.cuh"

namespace compressor {
namespace {

using namespace nvcuda;

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t ex) {
  uint32_t r;   // (a & mask) | ex in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(ex));
  return r;
}

__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 as_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// (q - zero) of a word's codes as exact half2 pairs, in slot order (see the header): 4 pairs for 4 bits
// (k = 0,4 | 1,5 | 2,6 | 3,7), 2 pairs for 8 bits (k = 0,2 | 1,3).
template <int BITS>
__device__ __forceinline__ void codes_minus_zero(uint32_t w, float zero, __half2 (&d)[BITS == 4 ? 4 : 2]) {
  constexpr uint32_t EX = 0x64006400;                      // fp16 1024 in both halves
  if constexpr (BITS == 4) {
    const __half2 lo_off = __float2half2_rn(1024.f + zero);      // exact: integers below 2048
    const __half2 hi_off = __float2half2_rn(-(64.f + zero));
    const __half2 sixteenth = __float2half2_rn(1.f / 16.f);
    const uint32_t w8 = w >> 8;
    d[0] = __hsub2(as_h2(lop3_and_or(w, 0x000f000f, EX)), lo_off);                 // k0, k4
    d[1] = __hfma2(as_h2(lop3_and_or(w, 0x00f000f0, EX)), sixteenth, hi_off);      // (1024 + 16 q)/16 - 64 - z
    d[2] = __hsub2(as_h2(lop3_and_or(w8, 0x000f000f, EX)), lo_off);                // k2, k6
    d[3] = __hfma2(as_h2(lop3_and_or(w8, 0x00f000f0, EX)), sixteenth, hi_off);     // k3, k7
  } else {
    const __half2 off = __float2half2_rn(1024.f + zero);
    d[0] = __hsub2(as_h2(lop3_and_or(w, 0x00ff00ff, EX)), off);                    // k0, k2
    d[1] = __hsub2(as_h2(lop3_and_or(w >> 8, 0x00ff00ff, EX)), off);               // k1, k3
  }
}

__device__ __forceinline__ uint32_t scaled(__half2 d, __half s, __half) {
  return as_u32(__hmul2(d, __half2half2(s)));               // one rounding of an exact product
}
__device__ __forceinline__ uint32_t scaled(__half2 d, __half s, __nv_bfloat16) {
  const float2 f = __half22float2(d);
  const float sf = __half2float(s);
  __nv_bfloat162 b = __floats2bfloat162_rn(f.x * sf, f.y * sf);   // exact fp32 products, rounded once
  return *reinterpret_cast<uint32_t*>(&b);
}

// 8 consecutive activations (a 16-byte run) reordered into the slot order of the words covering them.
template <int BITS>
__device__ __forceinline__ uint4 to_slots(uint4 v) {
  if constexpr (BITS == 4)     // x0..x7 -> x0 x4 x1 x5 x2 x6 x3 x7
    return make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                      __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
  else                         // x0..x7 -> x0 x2 x1 x3 x4 x6 x5 x7
    return make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632),
                      __byte_perm(v.z, v.w, 0x5410), __byte_perm(v.z, v.w, 0x7632));
}

}  // namespace

template <typename T, int BITS, int BM, int WARPS_M>
__global__ void __launch_bounds__(kThreads)
dq_gemm(const T* __restrict__ x, const int64_t* __restrict__ perm, const int32_t* __restrict__ qweight,
        const __half* __restrict__ scales, const __half* __restrict__ zeros, const T* __restrict__ bias,
        T* __restrict__ y, float* __restrict__ partials, int* __restrict__ locks, int M, int K, int N, int group, int steps_per_split) {
  constexpr int P = 32 / BITS, WPS = kBK / P;               // codes per word, word rows per step
  constexpr int WARPS_N = kWarps / WARPS_M;
  constexpr int FM = BM / WARPS_M / 16, FN = kBN / WARPS_N / 16;   // 16x16 fragments per warp
  constexpr int LD = kBK + 8;                               // shared row stride (halves): no bank conflicts
  constexpr int B_LOADS = kBN / 4 * WPS / kThreads;         // 128-bit qweight loads per thread per step
  constexpr int A_RUNS = BM * kBK / 8;                      // 16-byte runs of x per step
  constexpr int A_LOADS = (A_RUNS + kThreads - 1) / kThreads;
  static_assert(kBN / 4 * WPS % kThreads == 0, "whole qweight loads per thread");
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  constexpr int TILE_BYTES = (BM + kBN) * LD * 2, OUT_BYTES = BM * kBN * 4;
  __shared__ __align__(16) unsigned char smem[TILE_BYTES > OUT_BYTES ? TILE_BYTES : OUT_BYTES];
  T* As = reinterpret_cast<T*>(smem);                       // (BM, LD), slot order along k
  T* Bs = As + BM * LD;                                     // (BN, LD): column n's k run, slot order
  float* Cs = reinterpret_cast<float*>(smem);               // (BM, BN) accumulators, after the last step

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int row0 = blockIdx.y * BM, tile0 = blockIdx.x * (kBN / 32);
  const int KW = K / P, G = K / group, Nt = (N + 31) / 32;
  const int steps = (K + kBK - 1) / kBK;
  const int s0 = blockIdx.z * steps_per_split, s1 = min(steps, s0 + steps_per_split);

  Acc acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  uint4 a_reg[A_LOADS], b_reg[B_LOADS];
  uint2 s_reg[B_LOADS], z_reg[B_LOADS];

  auto load = [&](int step) {       // global -> registers for one step
    const int k0 = step * kBK;
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
      const int r = tid + i * kThreads, m = r / (kBK / 8), k = k0 + (r % (kBK / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < A_RUNS && row0 + m < M && k < K) {
        const T* xr = x + (size_t)(row0 + m) * K;
        if (perm == nullptr) {
          v = __ldg(reinterpret_cast<const uint4*>(xr + k));
        } else {
          unsigned short h[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) h[j] = __ldg(reinterpret_cast<const unsigned short*>(xr + __ldg(perm + k + j)));
          v = make_uint4(h[0] | uint32_t(h[1]) << 16, h[2] | uint32_t(h[3]) << 16, h[4] | uint32_t(h[5]) << 16,
                         h[6] | uint32_t(h[7]) << 16);
        }
      }
      a_reg[i] = v;
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
      const int l = tid + i * kThreads;                     // (tile, word row, 4-column group)
      const int c = (l % 8) * 4, w = (l / 8) % WPS, t = tile0 + l / (8 * WPS);
      const int kw = k0 / P + w;
      b_reg[i] = make_uint4(0, 0, 0, 0);
      s_reg[i] = make_uint2(0, 0);
      z_reg[i] = make_uint2(0, 0);
      if (t < Nt && kw < KW) {
        b_reg[i] = __ldg(reinterpret_cast<const uint4*>(qweight + ((size_t)t * KW + kw) * 32 + c));
        const size_t q = ((size_t)t * G + kw * P / group) * 32 + c;
        s_reg[i] = __ldg(reinterpret_cast<const uint2*>(scales + q));
        if (zeros != nullptr) z_reg[i] = __ldg(reinterpret_cast<const uint2*>(zeros + q));
      }
    }
  };

  auto store = [&]() {              // registers -> shared, dequantized, in slot order
#pragma unroll
    for (int i = 0; i < A_LOADS; ++i) {
      const int r = tid + i * kThreads;
      if (r < A_RUNS)
        *reinterpret_cast<uint4*>(As + (r / (kBK / 8)) * LD + (r % (kBK / 8)) * 8) = to_slots<BITS>(a_reg[i]);
    }
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i) {
      const int l = tid + i * kThreads;
      const int n = (l / (8 * WPS)) * 32 + (l % 8) * 4, w = (l / 8) % WPS;
      const uint32_t words[4] = {b_reg[i].x, b_reg[i].y, b_reg[i].z, b_reg[i].w};
      const __half* s = reinterpret_cast<const __half*>(&s_reg[i]);
      const __half* z = reinterpret_cast<const __half*>(&z_reg[i]);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const float zero = zeros != nullptr ? __half2float(z[v]) : float(1 << (BITS - 1));
        __half2 d[BITS == 4 ? 4 : 2];
        codes_minus_zero<BITS>(words[v], zero, d);
        T* dst = Bs + (n + v) * LD + w * P;
        if constexpr (BITS == 4)
          *reinterpret_cast<uint4*>(dst) = make_uint4(scaled(d[0], s[v], T()), scaled(d[1], s[v], T()),
                                                      scaled(d[2], s[v], T()), scaled(d[3], s[v], T()));
        else
          *reinterpret_cast<uint2*>(dst) = make_uint2(scaled(d[0], s[v], T()), scaled(d[1], s[v], T()));
      }
    }
  };

  if (s0 < s1) load(s0);
  for (int step = s0; step < s1; ++step) {
    store();
    __syncthreads();
    if (step + 1 < s1) load(step + 1);                      // in flight during the WMMA below
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], As + (wm * FM + i) * 16 * LD + kk, LD);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * FN + j) * 16 * LD + kk, LD);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * FM + i) * 16 * kBN + (wn * FN + j) * 16, acc[i][j], kBN, wmma::mem_row_major);
  __syncthreads();
  const int n0 = tile0 * 32;
  if (gridDim.z == 1) {             // the whole K: store y
    for (int e = tid; e < BM * kBN; e += kThreads) {
      const int m = row0 + e / kBN, n = n0 + e % kBN;
      if (m < M && n < N) y[(size_t)m * N + n] = Cvt<T>::from(bias != nullptr ? Cs[e] + Cvt<T>::to(bias[n]) : Cs[e]);
    }
    return;
  }
  // Split K: park this range's sums; the last block of the tile to arrive adds them up in split order
  // (deterministic), adds the bias and stores y, then re-arms the tile's counter for the next launch.
  float* mine = partials + (size_t)blockIdx.z * M * N;
  for (int e = tid; e < BM * kBN; e += kThreads) {
    const int m = row0 + e / kBN, n = n0 + e % kBN;
    if (m < M && n < N) mine[(size_t)m * N + n] = Cs[e];
  }
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  int* lock = locks + blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) last = atomicAdd(lock, 1) == (int)gridDim.z - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = tid; e < BM * kBN; e += kThreads) {
    const int m = row0 + e / kBN, n = n0 + e % kBN;
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int z = 0; z < (int)gridDim.z; ++z) v += __ldcg(partials + ((size_t)z * M + m) * N + n);
    y[(size_t)m * N + n] = Cvt<T>::from(bias != nullptr ? v + Cvt<T>::to(bias[n]) : v);
  }
  if (tid == 0) *lock = 0;
}

namespace {

template <typename T, int BITS>
cudaError_t launch(const DqArgs& a, const Plan& p, cudaStream_t stream) {
  const dim3 grid(p.grid_x, p.grid_y, p.splits);
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  if (p.bm == kDecodeBM)
    dq_gemm<T, BITS, kDecodeBM, kDecodeWarpsM><<<grid, kThreads, 0, stream>>>(
        x, a.perm, a.qweight, a.scales, a.zeros, bias, y, a.partials, a.locks, a.M, a.K, a.N, a.group, p.steps_per_split);
  else
    dq_gemm<T, BITS, kPrefillBM, kPrefillWarpsM><<<grid, kThreads, 0, stream>>>(
        x, a.perm, a.qweight, a.scales, a.zeros, bias, y, a.partials, a.locks, a.M, a.K, a.N, a.group, p.steps_per_split);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dq_gemm(const DqArgs& a, const Plan& plan, cudaStream_t stream) {
  if ((plan.splits > 1 && (a.partials == nullptr || a.locks == nullptr)) || (a.bits != 4 && a.bits != 8)) return cudaErrorInvalidValue;
  if (a.bf16) return a.bits == 4 ? launch<__nv_bfloat16, 4>(a, plan, stream) : launch<__nv_bfloat16, 8>(a, plan, stream);
  return a.bits == 4 ? launch<__half, 4>(a, plan, stream) : launch<__half, 8>(a, plan, stream);
}

}  // namespace compressor
