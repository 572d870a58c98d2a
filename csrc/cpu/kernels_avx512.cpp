// AVX-512 tile kernels (F, BW, VL, DQ, BF16, VNNI; Zen 4 and Cooper Lake / Sapphire Rapids or newer).
// The CPU's builtins (__builtin_frexpf, ...) stand in for <cmath>: see kernels.h on headers.
//
// The ISA is enabled for this translation unit only, by pragma, so the rest of the extension stays
// baseline x86-64 and `ops.cpp` picks this set at run time after checking CPU features.
// See kernels.h for the weight layout.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")
// gcc 12 flags the deliberately undefined register inside its own _mm512_undefined_* intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <utility>

#include "kernels.h"

namespace compressor {
namespace {

constexpr int kMaxRows = 4;  // rows x tiles <= 4: 3 slices x 2 halves x 4 = 24 int32 sums in the 32 zmm registers

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

// Software prefetch distance along each tile's stream, in bytes.
constexpr int kPrefetchBytes = 2048;  // 1024: 0.8x, 4096 and 8192: 0.9x the speed (4096x4096, M=1)

// TILES consecutive tiles (each a contiguous stream of memory), ROWS activation rows, on the
// integer dot-product unit. vpdpbusd multiplies the four unsigned bytes of each 32-bit lane by four
// signed bytes and adds the sum to the lane: a 4-bit word masked with 0x0F0F0F0F gives its codes
// 0, 2, 4, 6 as bytes, shifted down by 4 its codes 1, 3, 5, 7; an 8-bit word is four codes already.
// The activations are three int8 slices per block (PrepXFn), each broadcast as the four bytes that
// meet a word's codes, so one instruction does 64 multiply-adds where an fp32 FMA does 16 and no
// code is converted to float. Per block: sum_k x_k q_k = sigma * (A1 + A2 / 2^7 + A3 / 2^14), with
// A_p the exact int32 sums of slice p (|A_p| < 2^24: exact in fp32 too), then the epilogue of
// kernels.h.
// Several tiles at once because one core reading one sequential stream gets ~11 GB/s here, four
// streams ~18 GB/s: the hardware prefetchers run each stream only so far ahead.
template <int BITS, int ROWS, int TILES>
void gemv_tiles(const TileArgs& a) {
  constexpr int P = 32 / BITS;
  constexpr int XB = BITS == 4 ? 8 : 4;  // slice bytes per word
  const __m512 zero_sym = _mm512_set1_ps(float(1 << (BITS - 1)));
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  const int64_t wpb = a.block / P, blocks_per_group = a.group / a.block, NB = a.K / a.block, K = a.K;
  const int64_t tile_words = K / P * kTileN, tile_groups = a.G * kTileN;
  const int32_t* qw = a.qw;

  alignas(64) float out[TILES][ROWS][kTileN] = {};
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g = b / blocks_per_group;
    __m512i acc[TILES][ROWS][3][2];
    for (int t = 0; t < TILES; ++t)
      for (int r = 0; r < ROWS; ++r)
        for (int p = 0; p < 3; ++p) acc[t][r][p][0] = acc[t][r][p][1] = _mm512_setzero_si512();
    const int8_t* xb = a.xq + b * a.block;
    for (int64_t w = 0; w < wpb; ++w, qw += kTileN) {
      // The slices' bytes for this word ([low nibbles, high nibbles] or [codes]), broadcast where they
      // are used: the compiler folds each into its vpdpbusd as a {1to16} memory operand. Hoisting them
      // into registers (3 x 2 per row) spilled from 3 rows on, which made batch decoding 2-4x slower.
      const auto xv = [&](int r, int p, int i) {
        return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xb + (3 * r + p) * K + w * XB + 4 * i));
      };
      for (int t = 0; t < TILES; ++t) {
        const int32_t* q = qw + t * tile_words;
        _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes + 64, _MM_HINT_T0);
        const __m512i w_[2] = {_mm512_loadu_si512(q), _mm512_loadu_si512(q + 16)};
        for (int h = 0; h < 2; ++h) {
          if constexpr (BITS == 4) {
            const __m512i lo = _mm512_and_si512(w_[h], nib);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(w_[h], 4), nib);
            for (int r = 0; r < ROWS; ++r)
              for (int p = 0; p < 3; ++p)
                acc[t][r][p][h] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[t][r][p][h], lo, xv(r, p, 0)), hi,
                                                      xv(r, p, 1));
          } else {
            for (int r = 0; r < ROWS; ++r)
              for (int p = 0; p < 3; ++p) acc[t][r][p][h] = _mm512_dpbusd_epi32(acc[t][r][p][h], w_[h], xv(r, p, 0));
          }
        }
      }
    }
    // Block epilogue: out += (s sigma) * (A1 + A2 / 2^7 + A3 / 2^14) - (z s) * sum(x).
    const __m512 c7 = _mm512_set1_ps(1.0f / 128), c14 = _mm512_set1_ps(1.0f / 16384);
    for (int t = 0; t < TILES; ++t) {
      const uint16_t* sc = a.sc + t * tile_groups + g * kTileN;
      const uint16_t* zp = a.zp ? a.zp + t * tile_groups + g * kTileN : nullptr;
      for (int h = 0; h < 2; ++h) {
        const __m512 sh = load_half16(sc + 16 * h);
        const __m512 zs = _mm512_mul_ps(zp ? load_half16(zp + 16 * h) : zero_sym, sh);
        for (int r = 0; r < ROWS; ++r) {
          const __m512 sig = _mm512_set1_ps(a.xsigma[r * NB + b]), xs = _mm512_set1_ps(a.xsum[r * NB + b]);
          __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][r][2][h]), c14, _mm512_cvtepi32_ps(acc[t][r][0][h]));
          f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][r][1][h]), c7, f);
          __m512 o = _mm512_load_ps(out[t][r] + 16 * h);
          o = _mm512_fmadd_ps(f, _mm512_mul_ps(sh, sig), o);
          _mm512_store_ps(out[t][r] + 16 * h, _mm512_fnmadd_ps(zs, xs, o));
        }
      }
    }
  }
  for (int t = 0; t < TILES; ++t)
    for (int r = 0; r < ROWS; ++r)
      for (int h = 0; h < 2; ++h)
        _mm512_storeu_ps(a.y + r * a.ldy + t * kTileN + 16 * h, _mm512_load_ps(out[t][r] + 16 * h));
}

// At most 4 (rows x tiles) accumulator sets: 24 of the 32 zmm registers.
template <int BITS>
void gemv(const TileArgs& a, int rows, int tiles) {
  const int64_t tile_words = a.K / (32 / BITS) * kTileN, tile_groups = a.G * kTileN;
  for (int t = 0; t < tiles;) {
    TileArgs at = a;
    at.qw = a.qw + t * tile_words;
    at.sc = a.sc + t * tile_groups;
    at.zp = a.zp ? a.zp + t * tile_groups : nullptr;
    at.y = a.y + t * kTileN;
    const int left = tiles - t;
    if (rows == 1 && left >= 4) gemv_tiles<BITS, 1, 4>(at), t += 4;
    else if (rows == 1 && left >= 2) gemv_tiles<BITS, 1, 2>(at), t += 2;
    else if (rows == 2 && left >= 2) gemv_tiles<BITS, 2, 2>(at), t += 2;
    else {
      switch (rows) {
        case 1: gemv_tiles<BITS, 1, 1>(at); break;
        case 2: gemv_tiles<BITS, 2, 1>(at); break;
        case 3: gemv_tiles<BITS, 3, 1>(at); break;
        default: gemv_tiles<BITS, 4, 1>(at); break;
      }
      t += 1;
    }
  }
}

void gemv_any(const TileArgs& a, int rows, int tiles) {
  if (a.bits == 4) gemv<4>(a, rows, tiles);
  else gemv<8>(a, rows, tiles);
}

// max |x| over a block of n floats (n a multiple of 4, not always of 16: the tail is masked), and
// whether any is NaN or infinite.
inline float block_amax(const float* xb, int64_t n, bool* bad) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nonfinite = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = n - k >= 16 ? 0xFFFF : __mmask16((1u << (n - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mk, xb + k);
    mx = _mm512_max_ps(mx, _mm512_and_ps(v, absmask));
    nonfinite |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | +inf | -inf | SNaN
  }
  *bad = nonfinite != 0;
  return _mm512_reduce_max_ps(mx);
}

// See PrepXFn in kernels.h. 16 channels at a time; a block's tail (blocks are multiples of 4 or 8
// channels, not always of 16) is masked.
void prep_x(const float* x, int64_t M, int64_t K, int64_t block, int bits, int8_t* xq, float* xsigma, float* xsum) {
  const int64_t NB = K / block;
  // 4-bit: within each 8 channels, the even ones then the odd ones (the low and high nibbles).
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < NB; ++b) {
      const float* xb = x + m * K + b * block;
      bool bad;  // NaN or infinity anywhere in the block
      const float amax = block_amax(xb, block, &bad);
      int e = 0;
      if (!bad && amax > 0) {
        const float m127 = __builtin_frexpf(amax / 127.0f, &e);  // amax / 127 = m127 * 2^e, m127 in [0.5, 1)
        if (m127 == 0.5f) e -= 1;
      }
      const float sigma = __builtin_ldexpf(1.0f, e);
      // A non-finite x has no int8 slices: a NaN scale and sum make the row's outputs NaN, as the
      // float reference's would be (inf * w and inf - inf), instead of finite garbage.
      xsigma[m * NB + b] = bad ? __builtin_nanf("") : sigma;
      const __m512 inv[3] = {_mm512_set1_ps(__builtin_ldexpf(1.0f, -e)), _mm512_set1_ps(__builtin_ldexpf(1.0f, 7 - e)),
                             _mm512_set1_ps(__builtin_ldexpf(1.0f, 14 - e))};
      const __m512 step[2] = {_mm512_set1_ps(sigma), _mm512_set1_ps(__builtin_ldexpf(1.0f, e - 7))};
      __m512 qsum[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};  // exact: small integers
      for (int64_t k = 0; k < block; k += 16) {
        const __mmask16 mk = block - k >= 16 ? 0xFFFF : __mmask16((1u << (block - k)) - 1);
        __m512 r = _mm512_maskz_loadu_ps(mk, xb + k);
        for (int p = 0; p < 3; ++p) {
          const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(r, inv[p]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          qsum[p] = _mm512_add_ps(qsum[p], q);
          if (p < 2) r = _mm512_fnmadd_ps(q, step[p], r);  // exact: see kernels.h
          __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
          if (bits == 4) bytes = _mm_shuffle_epi8(bytes, order);
          _mm_mask_storeu_epi8(xq + (3 * m + p) * K + b * block + k, mk, bytes);
        }
      }
      xsum[m * NB + b] = bad ? __builtin_nanf("") : sigma * (_mm512_reduce_add_ps(qsum[0]) + (_mm512_reduce_add_ps(qsum[1]) / 128 +
                                                                    _mm512_reduce_add_ps(qsum[2]) / 16384));
    }
}

// See PrepX1Fn in kernels.h: one int8 slice per block, for the batch gemv, rows interleaved per word.
void prep_x1(const float* x, int64_t M, int64_t K, int64_t block, int bits, int8_t* xq, int64_t ldm, float* xsigma,
             float* xsum) {
  const int64_t NB = K / block, P = 32 / bits;
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < NB; ++b) {
      const float* xb = x + m * K + b * block;
      bool bad;
      const float amax = block_amax(xb, block, &bad);
      const __m512 inv = _mm512_set1_ps(amax > 0 && !bad ? 127.0f / amax : 0.0f);
      __m512i qsum = _mm512_setzero_si512();
      for (int64_t k = 0; k < block; k += 16) {
        const int64_t n = block - k >= 16 ? 16 : block - k;  // a multiple of P
        const __mmask16 mk = n == 16 ? 0xFFFF : __mmask16((1u << n) - 1);
        const __m512i q = _mm512_cvt_roundps_epi32(  // nearest even; |q| <= 127 by construction
            _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xb + k), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        qsum = _mm512_add_epi32(qsum, q);
        __m128i bytes = _mm512_cvtepi32_epi8(q);
        const int64_t w0 = (b * block + k) / P;  // the word of channel k: its P bytes go to (w, m)
        // Each word's P bytes stored straight from the register (a copy through memory of a run-time
        // length was ~40% of this function at 8 rows).
        if (bits == 4) {
          bytes = _mm_shuffle_epi8(bytes, order);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + (w0 * ldm + m) * 8), bytes);
          if (n > 8) _mm_storeh_pd(reinterpret_cast<double*>(xq + ((w0 + 1) * ldm + m) * 8), _mm_castsi128_pd(bytes));
        } else {
          alignas(16) int32_t words[4];
          _mm_store_si128(reinterpret_cast<__m128i*>(words), bytes);
          for (int64_t j = 0; j < n / 4; ++j) __builtin_memcpy(xq + ((w0 + j) * ldm + m) * 4, words + j, 4);
        }
      }
      const float d = amax / 127.0f;
      xsigma[m * NB + b] = bad ? __builtin_nanf("") : d;
      xsum[m * NB + b] = bad ? __builtin_nanf("") : d * float(_mm512_reduce_add_epi32(qsum));
    }
}

// Batch decode: one tile, ROWS <= 16 rows of one int8 slice each (prep_x1); above 8 rows one half-tile (16
// columns) at a time so that ROWS int32 sums fit the registers with the codes, up to 8 both halves in one
// pass over the block (dot_block2: +7% at batch 8, two groups of 4 rows, paired engine A/B). Per 16 words: one
// load, three instructions to split the nibbles, then 2 * ROWS vpdpbusd with the activations as
// {1to16} memory operands, all rows' bytes of a word side by side (a.xq + w * a.ldx + r * P: one
// base register, constant offsets); per block and half the epilogue of gemv_tiles, one slice.
// acc += u8 codes . s8 x[off .. off + 3] broadcast, as one vpdpbusd with a {1to16} memory operand. Inline
// asm because gcc, given the intrinsic, hoists the broadcasts into registers and spills the sums
// (16 rows: 16 sums + the codes already take 20 of the 32 registers).
template <int OFF>
__attribute__((always_inline)) inline void dpbusd_bcast(__m512i& acc, __m512i codes, const int8_t* x) {
  asm("vpdpbusd %c[off](%[x])%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [off] "i"(OFF), [x] "r"(x), [w] "v"(codes));
}

template <int BITS, int ROWS, int... R>
__attribute__((always_inline)) inline void dot_word(__m512i (&acc)[ROWS], __m512i lo, __m512i hi, const int8_t* x,
                                                    std::integer_sequence<int, R...>) {
  constexpr int P = 32 / BITS;
  if constexpr (BITS == 4) ((dpbusd_bcast<R * P>(acc[R], lo, x), dpbusd_bcast<R * P + 4>(acc[R], hi, x)), ...);
  else (dpbusd_bcast<R * P>(acc[R], lo, x), ...);
}

template <int BITS, int ROWS>
__attribute__((always_inline)) inline void dot_block(const int32_t* q, const int8_t* x, int64_t wpb, int64_t ldx,
                                                     __m512i (&acc)[ROWS]) {
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t w = 0; w < wpb; ++w, q += kTileN, x += ldx) {
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(q);
    if constexpr (BITS == 4) {
      const __m512i lo = _mm512_and_si512(wv, nib), hi = _mm512_and_si512(_mm512_srli_epi32(wv, 4), nib);
      dot_word<BITS, ROWS>(acc, lo, hi, x, std::make_integer_sequence<int, ROWS>{});
    } else {
      dot_word<BITS, ROWS>(acc, wv, wv, x, std::make_integer_sequence<int, ROWS>{});
    }
  }
}

// Both halves of the tile per word (ROWS <= 8: 2 * ROWS sums and four code registers fit): one pass over the
// block's words, both cache lines of each word requested together, one loop for both.
template <int BITS, int ROWS>
__attribute__((always_inline)) inline void dot_block2(const int32_t* q, const int8_t* x, int64_t wpb, int64_t ldx,
                                                      __m512i (&acc0)[ROWS], __m512i (&acc1)[ROWS]) {
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t w = 0; w < wpb; ++w, q += kTileN, x += ldx) {
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPrefetchBytes + 64, _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(q), w1 = _mm512_loadu_si512(q + 16);
    if constexpr (BITS == 4) {
      const __m512i lo0 = _mm512_and_si512(w0, nib), hi0 = _mm512_and_si512(_mm512_srli_epi32(w0, 4), nib);
      const __m512i lo1 = _mm512_and_si512(w1, nib), hi1 = _mm512_and_si512(_mm512_srli_epi32(w1, 4), nib);
      dot_word<BITS, ROWS>(acc0, lo0, hi0, x, std::make_integer_sequence<int, ROWS>{});
      dot_word<BITS, ROWS>(acc1, lo1, hi1, x, std::make_integer_sequence<int, ROWS>{});
    } else {
      dot_word<BITS, ROWS>(acc0, w0, w0, x, std::make_integer_sequence<int, ROWS>{});
      dot_word<BITS, ROWS>(acc1, w1, w1, x, std::make_integer_sequence<int, ROWS>{});
    }
  }
}

template <int BITS, int ROWS>
void gemv_rows_int8(const TileArgs& a) {
  constexpr int P = 32 / BITS;
  const __m512 zero_sym = _mm512_set1_ps(float(1 << (BITS - 1)));
  const int64_t wpb = a.block / P, blocks_per_group = a.group / a.block, NB = a.K / a.block;
  alignas(64) float out[ROWS][kTileN] = {};
  // half h of block b's sums into `out`
  const auto epilogue = [&](const __m512i (&acc)[ROWS], int64_t b, int h) __attribute__((always_inline)) {
    const int64_t g = b / blocks_per_group;
    const __m512 sh = load_half16(a.sc + g * kTileN + 16 * h);
    const __m512 zs = _mm512_mul_ps(a.zp ? load_half16(a.zp + g * kTileN + 16 * h) : zero_sym, sh);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 sig = _mm512_set1_ps(a.xsigma[r * NB + b]), xs = _mm512_set1_ps(a.xsum[r * NB + b]);
      __m512 o = _mm512_load_ps(out[r] + 16 * h);
      o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(sh, sig), o);
      _mm512_store_ps(out[r] + 16 * h, _mm512_fnmadd_ps(zs, xs, o));
    }
  };
  for (int64_t b = 0; b < NB; ++b) {
    const int32_t* q = a.qw + b * wpb * kTileN;
    const int8_t* x = a.xq + b * wpb * a.ldx;
    if constexpr (ROWS <= 8) {
      __m512i acc0[ROWS], acc1[ROWS];
      for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
      dot_block2<BITS, ROWS>(q, x, wpb, a.ldx, acc0, acc1);
      epilogue(acc0, b, 0);
      epilogue(acc1, b, 1);
    } else {
      for (int h = 0; h < 2; ++h) {
        __m512i acc[ROWS];
        for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_si512();
        dot_block<BITS, ROWS>(q + 16 * h, x, wpb, a.ldx, acc);
        epilogue(acc, b, h);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(a.y + r * a.ldy + 16 * h, _mm512_load_ps(out[r] + 16 * h));
}

template <int BITS, int... R>
void gemv_rows_int8_n(const TileArgs& a, int rows, std::integer_sequence<int, R...>) {
  ((rows == R + 1 ? gemv_rows_int8<BITS, R + 1>(a) : void()), ...);
}

constexpr int kBatchMaxRows = 16;
constexpr int kBatchMinRows = 2;  // from 2 rows: at 2-4 rows the three-slice gemv already takes ~2x as long (4096x4096)

void gemv_batch(const TileArgs& a, int rows, int tiles) {
  const int64_t tile_words = a.K / (32 / a.bits) * kTileN, tile_groups = a.G * kTileN;
  for (int t = 0; t < tiles; ++t) {
    TileArgs at = a;
    at.qw = a.qw + t * tile_words;
    at.sc = a.sc + t * tile_groups;
    at.zp = a.zp ? a.zp + t * tile_groups : nullptr;
    at.y = a.y + t * kTileN;
    if (a.bits == 4) gemv_rows_int8_n<4>(at, rows, std::make_integer_sequence<int, kBatchMaxRows>{});
    else gemv_rows_int8_n<8>(at, rows, std::make_integer_sequence<int, kBatchMaxRows>{});
  }
}

// Channels k0 .. k0 + kc of the tile dequantized: out[(k - k0) * ld + c] = (q[k, c] - zero) * scale,
// fp32 or bf16. k0 and kc are whole words; a group is a whole number of words.
template <int BITS>
void dequant_range(const TileArgs& a, int64_t k0, int64_t kc, void* out, int64_t ld, bool bf16) {
  constexpr int P = 32 / BITS;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero_sym = _mm512_set1_ps(float(1 << (BITS - 1)));
  int64_t g = -1;
  __m512 s0, s1, z0, z1;
  for (int64_t w = k0 / P; w < (k0 + kc) / P; ++w) {
    if (w * P / a.group != g) {
      g = w * P / a.group;
      s0 = load_half16(a.sc + g * kTileN), s1 = load_half16(a.sc + g * kTileN + 16);
      z0 = a.zp ? load_half16(a.zp + g * kTileN) : zero_sym;
      z1 = a.zp ? load_half16(a.zp + g * kTileN + 16) : zero_sym;
    }
    const __m512i w0 = _mm512_loadu_si512(a.qw + w * kTileN), w1 = _mm512_loadu_si512(a.qw + w * kTileN + 16);
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      const int64_t k = w * P + j - k0;
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

void dequant_any(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  if (a.bits == 4) dequant_range<4>(a, 0, a.K, out, ld, bf16);
  else dequant_range<8>(a, 0, a.K, out, ld, bf16);
}

// Prefill, fp32 activations: a GEMM whose B panel is dequantized on the fly. For each panel of
// kGemmKC input channels the tile's (kGemmKC, 32) weights are dequantized once into an L1-resident
// buffer, then every block of up to 12 rows of x multiplies it: per channel two loads of the panel,
// up to 12 broadcasts of x and 24 FMAs into 24 accumulators, so the FMA units stay busy. This reads
// the packed weight once and never writes the fp32 weight back to memory, where dequantizing blocks
// for an ATen GEMM wrote and re-read them (4096x4096 at M=64: 0.8-0.96x fp32 F.linear that way).
constexpr int64_t kGemmKC = 256;
constexpr int kGemmMR = 12;

template <int ROWS>
void gemm_rows(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy, bool add) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_load_ps(panel + k * kTileN), w1 = _mm512_load_ps(panel + k * kTileN + 16);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int h = 0; h < 2; ++h) {
      float* o = y + r * ldy + 16 * h;
      _mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), acc[r][h]) : acc[r][h]);
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
    case 6: return gemm_rows<6>(x, ldx, panel, kc, y, ldy, add);
    case 7: return gemm_rows<7>(x, ldx, panel, kc, y, ldy, add);
    case 8: return gemm_rows<8>(x, ldx, panel, kc, y, ldy, add);
    case 9: return gemm_rows<9>(x, ldx, panel, kc, y, ldy, add);
    case 10: return gemm_rows<10>(x, ldx, panel, kc, y, ldy, add);
    case 11: return gemm_rows<11>(x, ldx, panel, kc, y, ldy, add);
    default: return gemm_rows<12>(x, ldx, panel, kc, y, ldy, add);
  }
}

void gemm(const TileArgs& a, int64_t M) {
  alignas(64) float panel[kGemmKC * kTileN];
  for (int64_t k0 = 0; k0 < a.K; k0 += kGemmKC) {
    const int64_t kc = a.K - k0 < kGemmKC ? a.K - k0 : kGemmKC;
    if (a.bits == 4) dequant_range<4>(a, k0, kc, panel, kTileN, false);
    else dequant_range<8>(a, k0, kc, panel, kTileN, false);
    for (int64_t m0 = 0; m0 < M; m0 += kGemmMR) {
      const int rows = int(M - m0 < kGemmMR ? M - m0 : kGemmMR);
      gemm_block(rows, a.x + m0 * a.ldx + k0, a.ldx, panel, kc, a.y + m0 * a.ldy, a.ldy, k0 > 0);
    }
  }
}

// e^x for x <= 0 (scores minus their maximum), ~1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (truncation < 1.3e-7 relative), times 2^n by vscalefps (0 far below).
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is 0 in fp32; keeps n small; NaN passes
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts: n * hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 e = _mm512_set1_ps(1.0f / 720);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, n);
}

// See AttendFn in kernels.h. Per query head: the L scores (hd / 16 FMAs each, q and its scale in registers;
// the horizontal sums 16 positions at a time, sum16), softmax 16 at a time, then out = sum_j p_j v_j with two sets of
// accumulators (even and odd j) against the FMA latency. Head sizes other than 32, 64, 80, 96 and
// 128 take the portable loop.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return load_half16(p); }

// Lane i of the result: the sum of the 16 lanes of v[i]. Per 16 vectors ~45 instructions (unpacks within
// 128-bit lanes, then a transpose of the lanes), where a horizontal sum each takes ~8 and a long dependency chain.
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 u[8], w[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1]
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of v[4i] .. v[4i+3]
    const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // lane i of the result: the four 128-bit lanes of w[i] added
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// T: float, or uint16_t for an fp16 cache (widened exactly by vcvtph2ps).
template <int D, typename T>
void attend_heads(const float* q, const T* k, const T* v, int64_t G, int64_t L, float scale, float* out,
                  float* p) {
  constexpr int64_t hd = 16 * D;
  for (int64_t g = 0; g < G; ++g, q += hd, out += hd, p += L) {
    __m512 qv[D];
    for (int d = 0; d < D; ++d) qv[d] = _mm512_loadu_ps(q + 16 * d);
    __m512 mxv = _mm512_set1_ps(-__builtin_inff());
    int64_t j = 0;
    for (; j + 16 <= L; j += 16) {  // 16 positions, their dot products summed across lanes together
      __m512 s[16];
      for (int i = 0; i < 16; ++i) {
        const T* kj = k + (j + i) * hd;
        s[i] = _mm512_mul_ps(qv[0], load16(kj));
        for (int d = 1; d < D; ++d) s[i] = _mm512_fmadd_ps(qv[d], load16(kj + 16 * d), s[i]);
      }
      _mm512_storeu_ps(p + j, _mm512_mul_ps(sum16(s), _mm512_set1_ps(scale)));
    }
    for (; j < L; ++j) {
      const T* kj = k + j * hd;
      __m512 acc = _mm512_mul_ps(qv[0], load16(kj));
      for (int d = 1; d < D; ++d) acc = _mm512_fmadd_ps(qv[d], load16(kj + 16 * d), acc);
      p[j] = _mm512_reduce_add_ps(acc) * scale;
    }
    j = 0;
    for (; j + 16 <= L; j += 16) mxv = _mm512_max_ps(mxv, _mm512_loadu_ps(p + j));
    if (j < L) mxv = _mm512_mask_max_ps(mxv, __mmask16((1u << (L - j)) - 1), mxv, _mm512_loadu_ps(p + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
    __m512 sumv = _mm512_setzero_ps();
    for (j = 0; j < L; j += 16) {
      const __mmask16 mk = L - j >= 16 ? 0xFFFF : __mmask16((1u << (L - j)) - 1);
      const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + j), mx));
      sumv = _mm512_add_ps(sumv, _mm512_maskz_mov_ps(mk, e));
      _mm512_mask_storeu_ps(p + j, mk, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(sumv);
    __m512 a0[D], a1[D];
    for (int d = 0; d < D; ++d) a0[d] = a1[d] = _mm512_setzero_ps();
    for (j = 0; j + 2 <= L; j += 2) {
      const __m512 w0 = _mm512_set1_ps(p[j]), w1 = _mm512_set1_ps(p[j + 1]);
      for (int d = 0; d < D; ++d) {
        a0[d] = _mm512_fmadd_ps(w0, load16(v + j * hd + 16 * d), a0[d]);
        a1[d] = _mm512_fmadd_ps(w1, load16(v + (j + 1) * hd + 16 * d), a1[d]);
      }
    }
    if (j < L) {
      const __m512 w0 = _mm512_set1_ps(p[j]);
      for (int d = 0; d < D; ++d) a0[d] = _mm512_fmadd_ps(w0, load16(v + j * hd + 16 * d), a0[d]);
    }
    const __m512 iv = _mm512_set1_ps(inv);
    for (int d = 0; d < D; ++d) _mm512_storeu_ps(out + 16 * d, _mm512_mul_ps(_mm512_add_ps(a0[d], a1[d]), iv));
  }
}

// AttendFn / AttendF16Fn: the head sizes with code here, the portable loop for the others.
inline void attend_other(const float* q, const float* k, const float* v, int64_t G, int64_t L, int64_t hd, float scale,
                         float* out, float* p) {
  attend_ref(q, k, v, G, L, hd, scale, out, p);
}
inline void attend_other(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t L, int64_t hd,
                         float scale, float* out, float* p) {
  attend_f16_ref(q, k, v, G, L, hd, scale, out, p);
}

template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t G, int64_t L, int64_t hd, float scale, float* out,
            float* p) {
  switch (hd) {
    case 32: return attend_heads<2>(q, k, v, G, L, scale, out, p);
    case 64: return attend_heads<4>(q, k, v, G, L, scale, out, p);
    case 80: return attend_heads<5>(q, k, v, G, L, scale, out, p);
    case 96: return attend_heads<6>(q, k, v, G, L, scale, out, p);
    case 128: return attend_heads<8>(q, k, v, G, L, scale, out, p);
    default: return attend_other(q, k, v, G, L, hd, scale, out, p);
  }
}

// See SiluMulFn in kernels.h: g / (1 + e^-g) as g * sigmoid(g) with t = e^-|g| <= 1, so that the
// exponential never overflows: sigmoid = 1 / (1 + t) for g >= 0, t / (1 + t) below.
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? 0xFFFF : __mmask16((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(mk, gate + i), u = _mm512_maskz_loadu_ps(mk, up + i);
    const __m512 t = exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_and_ps(g, absmask)));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sig = _mm512_div_ps(_mm512_mask_blend_ps(neg, one, t), _mm512_add_ps(one, t));
    _mm512_mask_storeu_ps(out + i, mk, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
  }
}

// See ToHalfFn in kernels.h: 16 at a time with vcvtps2ph (round to nearest even); NaNs made 0x7E00 with their
// sign, as float_to_half does (vcvtps2ph keeps the payload).
void to_half(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan) {
      const __m256i sign = _mm256_and_si256(h, _mm256_set1_epi16(int16_t(0x8000)));
      h = _mm256_mask_mov_epi16(h, nan, _mm256_or_si256(sign, _mm256_set1_epi16(0x7E00)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = float_to_half(x[i]);
}

const KernelSet kSet{"avx512", kMaxRows, /*max_tiles=*/4, XForm::kInt8x3, prep_x, gemv_any, dequant_any, gemm, gemv_f16_avx2,
                     BatchGemv{kBatchMinRows, kBatchMaxRows, prep_x1, gemv_batch}, attend<float>, silu_mul,
                     attend<uint16_t>, to_half};

}  // namespace

const KernelSet* avx512_kernels() { return &kSet; }

}  // namespace compressor
