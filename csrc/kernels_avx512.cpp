// AVX-512 tile kernels (F, BW, VL, DQ, BF16, VNNI; Zen 4 and Ice Lake or newer).
//
// The ISA is enabled for this translation unit only, by pragma, so the rest of the extension stays
// baseline x86-64 and `ops.cpp` picks this set at run time after checking CPU features.
// See kernels.h for the weight layout.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")
// gcc 12 flags the deliberately undefined register inside its own _mm512_undefined_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "kernels.h"

namespace compressor {
namespace {

constexpr int kMaxRows = 4;  // 4 rows x 2 zmm partial sums + 4 x 2 totals fit the 32 zmm registers

// Code j of every int32 word in `w`, as 16 floats.
template <int BITS>
inline __m512 decode(__m512i w, int j, __m512 iota) {
  if constexpr (BITS == 4) {
    // vpermps reads only the low 4 bits of each index lane, so a 16-entry table {0, 1, ..., 15}
    // turns the low nibble into a float in one shuffle: shift + permute per 16 weights instead of
    // shift + and + convert, and no masking of the upper nibbles is needed.
    const __m512i idx = j == 0 ? w : _mm512_srli_epi32(w, 4 * j);
    return _mm512_permutexvar_ps(idx, iota);
  } else {
    // The top byte needs no mask after the shift; the bottom one needs no shift.
    const __m512i b = j == 3 ? _mm512_srli_epi32(w, 24)
                    : _mm512_and_si512(j == 0 ? w : _mm512_srli_epi32(w, 8 * j), _mm512_set1_epi32(0xFF));
    return _mm512_cvtepi32_ps(b);
  }
}

inline __m512 load_half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int BITS, int ROWS>
void gemv_rows(const TileArgs& a) {
  constexpr int P = 32 / BITS;
  // With one row, two accumulator chains per half-tile are too few to hide the 4-cycle FMA latency
  // (each word feeds P dependent FMAs); alternate codes between two sets of partial sums instead.
  constexpr int S = ROWS == 1 ? 2 : 1;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero_sym = _mm512_set1_ps(float(1 << (BITS - 1)));
  const int64_t words_per_block = a.block / P, blocks_per_group = a.group / a.block, NB = a.K / a.block;
  const int32_t* qw = a.qw;

  __m512 out[ROWS][2];
  for (int r = 0; r < ROWS; ++r) out[r][0] = out[r][1] = _mm512_setzero_ps();

  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g = b / blocks_per_group;
    __m512 acc[S][ROWS][2];
    for (int s = 0; s < S; ++s)
      for (int r = 0; r < ROWS; ++r) acc[s][r][0] = acc[s][r][1] = _mm512_setzero_ps();
    const float* xg = a.x + b * a.block;
    for (int64_t w = 0; w < words_per_block; ++w, qw += kTileN) {
      const __m512i w0 = _mm512_loadu_si512(qw);
      const __m512i w1 = _mm512_loadu_si512(qw + 16);
      const float* xw = xg + w * P;
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        const __m512 d0 = decode<BITS>(w0, j, iota);
        const __m512 d1 = decode<BITS>(w1, j, iota);
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; ++r) {
          const __m512 xb = _mm512_set1_ps(xw[r * a.ldx + j]);
          acc[j % S][r][0] = _mm512_fmadd_ps(d0, xb, acc[j % S][r][0]);
          acc[j % S][r][1] = _mm512_fmadd_ps(d1, xb, acc[j % S][r][1]);
        }
      }
    }
    // Block epilogue: out += s * sum(x q) - (z s) * sum(x).
    const uint16_t* sc = a.sc + g * kTileN;
    const __m512 s0 = load_half16(sc), s1 = load_half16(sc + 16);
    const __m512 z0 = a.zp ? load_half16(a.zp + g * kTileN) : zero_sym;
    const __m512 z1 = a.zp ? load_half16(a.zp + g * kTileN + 16) : zero_sym;
    const __m512 zs0 = _mm512_mul_ps(z0, s0), zs1 = _mm512_mul_ps(z1, s1);
    for (int r = 0; r < ROWS; ++r) {
      __m512 p0 = acc[0][r][0], p1 = acc[0][r][1];
      if constexpr (S == 2) {
        p0 = _mm512_add_ps(p0, acc[1][r][0]);
        p1 = _mm512_add_ps(p1, acc[1][r][1]);
      }
      const __m512 xs = _mm512_set1_ps(a.xsum[r * NB + b]);
      out[r][0] = _mm512_fnmadd_ps(zs0, xs, _mm512_fmadd_ps(p0, s0, out[r][0]));
      out[r][1] = _mm512_fnmadd_ps(zs1, xs, _mm512_fmadd_ps(p1, s1, out[r][1]));
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(a.y + r * a.ldy, out[r][0]);
    _mm512_storeu_ps(a.y + r * a.ldy + 16, out[r][1]);
  }
}

template <int BITS>
void gemv(const TileArgs& a, int rows) {
  switch (rows) {
    case 1: return gemv_rows<BITS, 1>(a);
    case 2: return gemv_rows<BITS, 2>(a);
    case 3: return gemv_rows<BITS, 3>(a);
    default: return gemv_rows<BITS, 4>(a);
  }
}

void gemv_any(const TileArgs& a, int rows) {
  if (a.bits == 4) gemv<4>(a, rows);
  else gemv<8>(a, rows);
}

template <int BITS>
void dequant(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  constexpr int P = 32 / BITS;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero_sym = _mm512_set1_ps(float(1 << (BITS - 1)));
  const int64_t words_per_group = a.group / P;
  const int32_t* qw = a.qw;
  int64_t k = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    const __m512 s0 = load_half16(a.sc + g * kTileN), s1 = load_half16(a.sc + g * kTileN + 16);
    const __m512 z0 = a.zp ? load_half16(a.zp + g * kTileN) : zero_sym;
    const __m512 z1 = a.zp ? load_half16(a.zp + g * kTileN + 16) : zero_sym;
    for (int64_t w = 0; w < words_per_group; ++w, qw += kTileN) {
      const __m512i w0 = _mm512_loadu_si512(qw), w1 = _mm512_loadu_si512(qw + 16);
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j, ++k) {
        // (q - z) * s in this order, exactly as the reference computes it: q - z is exact, so the
        // result is the correctly rounded product and the GEMM sees bit-identical weights.
        const __m512 d0 = _mm512_mul_ps(_mm512_sub_ps(decode<BITS>(w0, j, iota), z0), s0);
        const __m512 d1 = _mm512_mul_ps(_mm512_sub_ps(decode<BITS>(w1, j, iota), z1), s1);
        if (bf16) {
          // vcvtne2ps2bf16 packs 32 floats into one register with round-to-nearest-even.
          const __m512bh b = _mm512_cvtne2ps_pbh(d1, d0);
          _mm512_storeu_si512(static_cast<uint16_t*>(out) + k * ld, reinterpret_cast<__m512i>(b));
        } else {
          float* o = static_cast<float*>(out) + k * ld;
          _mm512_storeu_ps(o, d0);
          _mm512_storeu_ps(o + 16, d1);
        }
      }
    }
  }
}

void dequant_any(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  if (a.bits == 4) dequant<4>(a, out, ld, bf16);
  else dequant<8>(a, out, ld, bf16);
}

const KernelSet kSet{"avx512", kMaxRows, /*scaled_x=*/false, gemv_any, dequant_any, gemv_f16_avx2};

}  // namespace

const KernelSet* avx512_kernels() { return &kSet; }

}  // namespace compressor
