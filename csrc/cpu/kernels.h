// Tile kernels for group-wise dequant-matmul, one set per instruction set.
//
// This header is plain C++ on purpose: the ISA-specific translation units (kernels_avx512.cpp,
// kernels_avx2.cpp) are compiled with `#pragma GCC target(...)` and must not include ATen headers.
// If they did, inline functions from those headers could be emitted with AVX-512 instructions and
// the linker could keep that copy for the generic code, which would then crash on older CPUs.
//
// Repacked weight layout ("tile-major"), shared by every kernel and by the Python reference
// (compressor/kernels/repack.py). With K = in_features, N = out_features, P = 32 / bits codes per
// int32 word, kTileN = 32 output columns per tile, Nt = ceil(N / kTileN), G = K / group:
//   qweight int32 (Nt, K / P, kTileN): word [t, w, c] holds the codes of input channels
//           k = P*w .. P*w + P-1 of output column n = kTileN*t + c, code j in bits [bits*j, bits*(j+1)).
//           This is the GPTQ word (8 nibbles along in_features) with the columns cut into tiles,
//           so that one thread streams one contiguous block of memory per tile instead of K/P
//           strided rows (the strided walk defeats the hardware prefetcher and the TLB).
//   scales  fp16  (Nt, G, kTileN), zeros fp16 (Nt, G, kTileN) or null for symmetric
//           (zero = 2**(bits-1)). Padded columns have scale 0, so they contribute 0.
#pragma once

#include <cstdint>

namespace compressor {

constexpr int kTileN = 32;

struct TileArgs {
  const float* x;        // (M, K) fp32 activations, row stride ldx
  int64_t ldx;
  const float* xsum;     // (M, K / block) sums of x over each block, row stride K / block
  const int32_t* qw;     // (K / P, kTileN) words of this tile
  const uint16_t* sc;    // (G, kTileN) fp16 scales of this tile
  const uint16_t* zp;    // (G, kTileN) fp16 zeros of this tile, or nullptr (symmetric)
  int64_t K, G, group;   // group = K / G input channels per group
  int64_t block;         // channels per partial sum in gemv; divides group (see ops.cpp)
  int bits;
  float* y;              // (M, kTileN) fp32 output block, row stride ldy; overwritten
  int64_t ldy;
  // XForm::kInt8x3 only (see PrepXFn): x as three int8 slices per row, (M, 3, K) bytes, and the
  // slice scale of each (row, block), (M, K / block). For KernelSet::batch (PrepX1Fn): one slice,
  // the rows of each word side by side (row r of word w at xq + w * ldx + r * P), and its scale per
  // (row, block).
  const int8_t* xq;
  const float* xsigma;
};

// y[m, :] = sum_k x[m, k] * (q[k, :] - zero[g(k), :]) * scale[g(k), :] for m < rows <= max_rows, over
// `tiles` <= max_tiles consecutive tiles (qw, sc, zp point at the first; y[m, t * kTileN + c]).
// The inner loop multiplies raw codes and applies scale and zero once per group:
//   sum_k x_k (q_k - z) s = s * (sum_k x_k q_k) - (z s) * (sum_k x_k)
// which leaves one FMA per weight. The two sums cancel by up to ~3x, so they are taken over blocks
// of at most 256 channels (`block`) rather than whole per-channel rows: that keeps the fp32 result
// within ~1e-6 of a float64 matmul.
using GemvTileFn = void (*)(const TileArgs& a, int rows, int tiles);

// Dequantize a tile to fp32 (or bf16) W^T: out[k * ld + c] = (q[k, c] - zero) * scale for k < K,
// c < kTileN. Used by the large-batch path, which feeds the result to a GEMM.
using DequantTileFn = void (*)(const TileArgs& a, void* out, int64_t ld, bool bf16);

// Prefill GEMM over one tile, fp32 x: y[m * ldy + c] = sum_k x[m * ldx + k] * W[k, c] for m < M,
// c < kTileN (a.x, a.ldx, a.y, a.ldy; y is overwritten). Optional: where a set has none, ops.cpp
// dequantizes blocks with DequantTileFn and calls ATen's GEMM.
using GemmTileFn = void (*)(const TileArgs& a, int64_t M);

// fp16-weight matrix-vector product for the few float layers left in a quantized model (the tied
// lm_head, stored in fp16): y[r * ldy + n] = sum_k x[r * ldx + k] * w[n * K + k] for r < rows <= 4,
// n < n_out; w is row-major fp16 (n_out, K), accumulation in fp32.
using GemvF16Fn = void (*)(const float* x, int64_t ldx, int rows, const uint16_t* w, int64_t K, int64_t n_out,
                           float* y, int64_t ldy);
constexpr int kF16MaxRows = 4;

// How the gemv wants its activations (ops.cpp prepares them once per call):
//  kPlain   x as is.
//  kScaled  channel k multiplied by 2^-(bits * (k % P)), except where k % P == P - 1 (powers of two:
//           exact), so that codes can be multiplied where they sit in their word (kernels_avx2.cpp).
//  kInt8x3  x split into three int8 slices per block of `block` channels (PrepXFn), so that the
//           products run on the integer dot-product unit (VNNI, kernels_avx512.cpp).
// xsum is the sum of the unscaled x, or for kInt8x3 of the slices (PrepXFn).
enum class XForm { kPlain, kScaled, kInt8x3 };

// kInt8x3 preparation, one row at a time. For each block b of `block` channels, with
// sigma = 2^ceil(log2(max|x_b| / 127)) (a power of two, so every step below is exact):
//   x = sigma * (a1 + a2 / 2^7 + a3 / 2^14) + r,  a1 in [-127, 127], a2, a3 in [-64, 64],
//   |r| <= sigma / 2^15 <= max|x_b| * 2^-21,
// the error of a float with a 21-bit mantissa relative to the block maximum. Slice p of row m is
// written to xq[(3 m + p) K + ...] in the byte order the gemv reads (for 4-bit codes, channels
// 0, 2, 4, 6, 1, 3, 5, 7 of every word, low nibbles then high nibbles); sigma to xsigma[m NB + b].
// xsum[m NB + b] is overwritten with the sum of the sliced x, not of x: then the zero-point term
// cancels the slices' own sum exactly, and the error is sum_k r_k (q_k - z) * s, not sum_k r_k q_k * s
// (q ~ 128 for 8-bit codes: ~4x more with an outlier in the block).
using PrepXFn = void (*)(const float* x, int64_t M, int64_t K, int64_t block, int bits, int8_t* xq,
                         float* xsigma, float* xsum);

// Batch decode (KernelSet::batch): x as one int8 slice per block, the way llama.cpp's Q8 activations
// and every W4A8 kernel take it, so that each product is one byte of one vpdpbusd instead of three:
// at 5-31 rows the three-slice gemv is bound by its multiply-adds, not by the weight stream. For each
// block b of `block` channels of row m, with d = max|x_b| / 127 (a float, not a power of two):
//   q_k = round_half_even(x_k * (127 / max|x_b|)) in [-127, 127],  x_k ~ d * q_k,
// an error of at most d / 2 per channel: ~2^-8 of the block maximum (a bf16 activation: 2^-9 of
// itself). The P bytes of row m that meet word w (P = 32 / bits channels, in the gemv's byte order as
// for PrepXFn) go to xq[(w ldm + m) P]: all rows of a word side by side (ldm >= M: the rows of the
// whole call, when a thread prepares some of them with xq at its first row). d goes to xsigma[m NB + b],
// d * sum_k q_k to xsum[m NB + b]. Non-finite x in a block: d and the sum are NaN. The gemv reads row r
// of word w at a.xq + w * a.ldx + r * P (a.ldx = M P, a.xq at the call's first row).
using PrepX1Fn = void (*)(const float* x, int64_t M, int64_t K, int64_t block, int bits, int8_t* xq,
                          int64_t ldm, float* xsigma, float* xsum);

struct BatchGemv {
  int min_rows = 0;   // calls with at least this many rows (and fewer than the prefill GEMM's) use it, when
                      // the calling thread allows int8 activations (ops.cpp, set_int8_activations)
  int max_rows = 0;   // rows one gemv call holds
  PrepX1Fn prep = nullptr;
  GemvTileFn gemv = nullptr;  // gemv(a, rows, tiles): a.xq / a.xsigma / a.xsum from prep, rows <= max_rows
};

// Decode attention (layer.cpp), one cached KV head and the G query heads that share it:
// out (G, hd) = softmax(q k^T * scale) v over its first L positions, in fp32. q, out: G rows of hd
// floats, contiguous; k, v: L rows of hd, contiguous; p: scratch for G * L floats.
using AttendFn = void (*)(const float* q, const float* k, const float* v, int64_t G, int64_t L, int64_t hd,
                          float scale, float* out, float* p);
// The portable one (kernels_scalar.cpp), used by the sets without their own and for shapes theirs refuse.
void attend_ref(const float* q, const float* k, const float* v, int64_t G, int64_t L, int64_t hd, float scale,
                float* out, float* p);
// The same over an fp16 cache (k, v: IEEE half bits), each element widened to fp32 exactly.
using AttendF16Fn = void (*)(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t L, int64_t hd,
                             float scale, float* out, float* p);
void attend_f16_ref(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t L, int64_t hd,
                    float scale, float* out, float* p);

// The gated MLP's activation (layer.cpp): out[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + e^-g).
using SiluMulFn = void (*)(const float* gate, const float* up, float* out, int64_t n);
void silu_mul_ref(const float* gate, const float* up, float* out, int64_t n);

// A row of fp32 as IEEE half bits, rounded to nearest even, every NaN the quiet 0x7E00 with its sign, as
// float_to_half (the fp16 KV cache's rows, block.h).
using ToHalfFn = void (*)(const float* x, int64_t n, uint16_t* out);
void to_half_ref(const float* x, int64_t n, uint16_t* out);

struct KernelSet {
  const char* name;
  int max_rows;   // rows one gemv call can hold in registers
  int max_tiles;  // tiles one gemv call streams at once
  XForm xform;
  PrepXFn prep_x;  // kInt8x3 only, else nullptr
  GemvTileFn gemv;
  DequantTileFn dequant;
  GemmTileFn gemm;  // or nullptr
  GemvF16Fn gemv_f16;
  BatchGemv batch = {};
  AttendFn attend = attend_ref;
  SiluMulFn silu_mul = silu_mul_ref;
  AttendF16Fn attend_f16 = attend_f16_ref;
  ToHalfFn to_half = to_half_ref;
};

// The AVX2 fp16 gemv, also used by the AVX-512 set (it is bound by memory, not by vector width).
void gemv_f16_avx2(const float* x, int64_t ldx, int rows, const uint16_t* w, int64_t K, int64_t n_out, float* y,
                   int64_t ldy);

// Each returns nullptr when the translation unit was built without that instruction set.
const KernelSet* avx512_kernels();
const KernelSet* avx2_kernels();
const KernelSet* scalar_kernels();

// fp16 <-> fp32 and fp32 -> bf16 without intrinsics (scalar paths and tails). float_to_half rounds to
// nearest even, as c10::Half(float) does (the same bit manipulation, from the FP16 library).
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
uint16_t float_to_bf16(float f);

}  // namespace compressor
