// AVX2 + FMA + F16C tile kernels (Haswell / Zen 1 or newer). Same algorithm as the AVX-512 set,
// with 8-lane registers: a 32-column tile is four ymm registers.
//
// vpermps on ymm uses only 3 index bits, so it cannot look up 16 nibble values; codes are
// decoded with shift + and + convert instead.
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "kernels.h"

namespace compressor {
namespace {

// 16 ymm registers: 2 rows x 4 partial sums + 4 decoded codes + 1 broadcast. The running totals
// live in a small stack block, touched once per group.
constexpr int kMaxRows = 2;
// Software prefetch distance along the tile stream. The hardware prefetcher alone leaves the loop
// waiting on DRAM part of the time: decoding costs about as long as reading, so the two must overlap.
constexpr int kPrefetchBytes = 1024;

template <int BITS>
inline __m256 decode(__m256i w, int j) {
  constexpr int mask = (1 << BITS) - 1;
  const __m256i s = j == 0 ? w : _mm256_srli_epi32(w, BITS * j);
  const __m256i b = BITS * (j + 1) == 32 ? s : _mm256_and_si256(s, _mm256_set1_epi32(mask));
  return _mm256_cvtepi32_ps(b);
}

// Code j of each word left in place, as the float q * 2^(BITS*j): one AND instead of shift + AND.
// The gemv multiplies it by x pre-scaled by 2^-(BITS*j) (XForm::kScaled), so the product is
// x * q exactly. The top code would come out negative (sign bit), so it is shifted down instead.
template <int BITS>
inline __m256 decode_in_place(__m256i w, int j) {
  constexpr int P = 32 / BITS;
  if (j == P - 1) return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, BITS * j));
  return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * j))));
}

inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int BITS, int ROWS>
void gemv_rows(const TileArgs& a) {
  constexpr int P = 32 / BITS;
  const __m256 zero_sym = _mm256_set1_ps(float(1 << (BITS - 1)));
  const int64_t words_per_block = a.block / P, blocks_per_group = a.group / a.block, NB = a.K / a.block;
  const int32_t* qw = a.qw;

  alignas(32) float out[ROWS][kTileN] = {};
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g = b / blocks_per_group;
    __m256 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();
    const float* xg = a.x + b * a.block;
    for (int64_t w = 0; w < words_per_block; ++w, qw += kTileN) {
      __m256i wv[4];
      for (int c = 0; c < 4; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + 8 * c));
      _mm_prefetch(reinterpret_cast<const char*>(qw) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(qw) + kPrefetchBytes + 64, _MM_HINT_T0);
      const float* xw = xg + w * P;
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        __m256 d[4];
        for (int c = 0; c < 4; ++c) d[c] = decode_in_place<BITS>(wv[c], j);
        for (int r = 0; r < ROWS; ++r) {
          const __m256 xb = _mm256_broadcast_ss(xw + r * a.ldx + j);
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(d[c], xb, acc[r][c]);
        }
      }
    }
    // Block epilogue: out += s * sum(x q) - (z s) * sum(x).
    for (int c = 0; c < 4; ++c) {
      const __m256 s = load_half8(a.sc + g * kTileN + 8 * c);
      const __m256 z = a.zp ? load_half8(a.zp + g * kTileN + 8 * c) : zero_sym;
      const __m256 zs = _mm256_mul_ps(z, s);
      for (int r = 0; r < ROWS; ++r) {
        const __m256 xs = _mm256_set1_ps(a.xsum[r * NB + b]);
        __m256 o = _mm256_load_ps(out[r] + 8 * c);
        o = _mm256_fnmadd_ps(zs, xs, _mm256_fmadd_ps(acc[r][c], s, o));
        _mm256_store_ps(out[r] + 8 * c, o);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(a.y + r * a.ldy + 8 * c, _mm256_load_ps(out[r] + 8 * c));
}

void gemv_any(const TileArgs& a, int rows, int /*tiles: max_tiles is 1*/) {
  if (a.bits == 4) {
    if (rows == 1) gemv_rows<4, 1>(a); else gemv_rows<4, 2>(a);
  } else {
    if (rows == 1) gemv_rows<8, 1>(a); else gemv_rows<8, 2>(a);
  }
}

// Channels k0 .. k0 + kc of the tile dequantized: out[(k - k0) * ld + c] = (q[k, c] - zero) * scale, fp32 or
// bf16. k0 and kc are whole words; a group is a whole number of words.
template <int BITS>
void dequant_range(const TileArgs& a, int64_t k0, int64_t kc, void* out, int64_t ld, bool bf16) {
  constexpr int P = 32 / BITS;
  const __m256 zero_sym = _mm256_set1_ps(float(1 << (BITS - 1)));
  int64_t g = -1;
  __m256 s[4], z[4];
  for (int64_t w = k0 / P; w < (k0 + kc) / P; ++w) {
    if (w * P / a.group != g) {
      g = w * P / a.group;
      for (int c = 0; c < 4; ++c) {
        s[c] = load_half8(a.sc + g * kTileN + 8 * c);
        z[c] = a.zp ? load_half8(a.zp + g * kTileN + 8 * c) : zero_sym;
      }
    }
    const int32_t* qw = a.qw + w * kTileN;
    for (int j = 0; j < P; ++j) {
      const int64_t k = w * P + j - k0;
      alignas(32) float row[kTileN];
      for (int c = 0; c < 4; ++c) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + 8 * c));
        // (q - z) * s, in the reference's order, so the GEMM sees bit-identical weights.
        _mm256_store_ps(row + 8 * c, _mm256_mul_ps(_mm256_sub_ps(decode<BITS>(wv, j), z[c]), s[c]));
      }
      if (bf16) {
        uint16_t* o = static_cast<uint16_t*>(out) + k * ld;
        for (int c = 0; c < kTileN; ++c) o[c] = float_to_bf16(row[c]);
      } else {
        float* o = static_cast<float*>(out) + k * ld;
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + 8 * c, _mm256_load_ps(row + 8 * c));
      }
    }
  }
}

template <int BITS>
void dequant(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  dequant_range<BITS>(a, 0, a.K, out, ld, bf16);
}

// Prefill, fp32 activations: the AVX-512 set's GEMM with 8-lane registers. Per panel of kGemmKC channels the
// tile's (kGemmKC, 32) weights are dequantized once into an L1-resident buffer; then per half tile (16 columns)
// every block of up to 6 rows multiplies it: 12 accumulators, 2 weight registers, 1 broadcast of x (the 16
// ymm registers). The packed weight is read once and the fp32 weight never written to memory.
constexpr int64_t kGemmKC = 128;
constexpr int kGemmMR = 6;

template <int ROWS>
void gemm_rows(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy, bool add) {
  __m256 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(panel + k * kTileN), w1 = _mm256_load_ps(panel + k * kTileN + 8);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) {
      float* o = y + r * ldy + 8 * h;
      _mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), acc[r][h]) : acc[r][h]);
    }
}

void gemm_block(int rows, const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy,
                bool add) {
  switch (rows) {
    case 1: return gemm_rows<1>(x, ldx, panel, kc, y, ldy, add);
    case 2: return gemm_rows<2>(x, ldx, panel, kc, y, ldy, add);
    case 3: return gemm_rows<3>(x, ldx, panel, kc, y, ldy, add);
    case 4: return gemm_rows<4>(x, ldx, panel, kc, y, ldy, add);
    case 5: return gemm_rows<5>(x, ldx, panel, kc, y, ldy, add);
    default: return gemm_rows<6>(x, ldx, panel, kc, y, ldy, add);
  }
}

void gemm(const TileArgs& a, int64_t M) {
  alignas(32) float panel[kGemmKC * kTileN];
  for (int64_t k0 = 0; k0 < a.K; k0 += kGemmKC) {
    const int64_t kc = a.K - k0 < kGemmKC ? a.K - k0 : kGemmKC;
    if (a.bits == 4) dequant_range<4>(a, k0, kc, panel, kTileN, false);
    else dequant_range<8>(a, k0, kc, panel, kTileN, false);
    for (int64_t m0 = 0; m0 < M; m0 += kGemmMR) {
      const int rows = int(M - m0 < kGemmMR ? M - m0 : kGemmMR);
      for (int h = 0; h < 2; ++h)
        gemm_block(rows, a.x + m0 * a.ldx + k0, a.ldx, panel + 16 * h, kc, a.y + m0 * a.ldy + 16 * h, a.ldy, k0 > 0);
    }
  }
}

void dequant_any(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  if (a.bits == 4) dequant<4>(a, out, ld, bf16);
  else dequant<8>(a, out, ld, bf16);
}

const KernelSet kSet{"avx2", kMaxRows, /*max_tiles=*/1, XForm::kScaled, nullptr, gemv_any, dequant_any, gemm, gemv_f16_avx2};

}  // namespace

void gemv_f16_avx2(const float* x, int64_t ldx, int rows, const uint16_t* w, int64_t K, int64_t n_out, float* y,
                   int64_t ldy) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = 0; n < n_out; ++n) {
    const uint16_t* wn = w + n * K;
    for (int r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx;
      // Four accumulators: one would leave the loop waiting on the FMA latency.
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t k = 0;
      for (; k < K32; k += 32)
        for (int u = 0; u < 4; ++u)
          acc[u] = _mm256_fmadd_ps(load_half8(wn + k + 8 * u), _mm256_loadu_ps(xr + k + 8 * u), acc[u]);
      __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float out = _mm_cvtss_f32(h);
      for (; k < K; ++k) out += xr[k] * _cvtsh_ss(wn[k]);
      y[r * ldy + n] = out;
    }
  }
}

const KernelSet* avx2_kernels() { return &kSet; }

}  // namespace compressor
