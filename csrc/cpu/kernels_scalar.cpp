// Portable tile kernels: any CPU, baseline flags. Slow but exact; used when neither AVX2 nor
// AVX-512 is available, and as a readable statement of what the vector kernels compute.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace compressor {

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise the mantissa
    exp = 113;
    while (!(man & 0x400)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  const auto bits = [](float v) { uint32_t u; std::memcpy(&u, &v, 4); return u; };
  const auto from = [](uint32_t u) { float v; std::memcpy(&v, &u, 4); return v; };
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = from((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

void to_half_ref(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(x[i]);
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40);  // quiet nan
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even
  return uint16_t(bits >> 16);
}

namespace {

inline float code(const int32_t* qw, int64_t k, int c, int bits) {
  const int per = 32 / bits;
  const uint32_t word = uint32_t(qw[(k / per) * kTileN + c]);
  return float((word >> (bits * (k % per))) & ((1u << bits) - 1));
}

inline float zero_of(const TileArgs& a, int64_t g, int c) {
  return a.zp ? half_to_float(a.zp[g * kTileN + c]) : float(1 << (a.bits - 1));
}

void gemv(const TileArgs& a, int rows, int /*tiles: max_tiles is 1*/) {
  for (int r = 0; r < rows; ++r) {
    const float* x = a.x + r * a.ldx;
    for (int c = 0; c < kTileN; ++c) {
      float out = 0.f;
      const int64_t NB = a.K / a.block;
      for (int64_t b = 0; b < NB; ++b) {
        const int64_t g = b * a.block / a.group;
        float dot = 0.f;
        for (int64_t k = b * a.block; k < (b + 1) * a.block; ++k) dot += x[k] * code(a.qw, k, c, a.bits);
        const float s = half_to_float(a.sc[g * kTileN + c]);
        out += s * dot - zero_of(a, g, c) * s * a.xsum[r * NB + b];
      }
      a.y[r * a.ldy + c] = out;
    }
  }
}

void dequant(const TileArgs& a, void* out, int64_t ld, bool bf16) {
  for (int64_t k = 0; k < a.K; ++k) {
    const int64_t g = k / a.group;
    for (int c = 0; c < kTileN; ++c) {
      const float w = (code(a.qw, k, c, a.bits) - zero_of(a, g, c)) * half_to_float(a.sc[g * kTileN + c]);
      if (bf16) static_cast<uint16_t*>(out)[k * ld + c] = float_to_bf16(w);
      else static_cast<float*>(out)[k * ld + c] = w;
    }
  }
}

void gemv_f16(const float* x, int64_t ldx, int rows, const uint16_t* w, int64_t K, int64_t n_out, float* y,
              int64_t ldy) {
  for (int64_t n = 0; n < n_out; ++n)
    for (int r = 0; r < rows; ++r) {
      float out = 0.f;
      for (int64_t k = 0; k < K; ++k) out += x[r * ldx + k] * half_to_float(w[n * K + k]);
      y[r * ldy + n] = out;
    }
}

}  // namespace

// See AttendFn in kernels.h. Eight partial sums per dot product (the compiler vectorizes them).
namespace {
inline float widen(float f) { return f; }
inline float widen(uint16_t h) { return half_to_float(h); }

template <typename T>
void attend_any(const float* q, const T* k, const T* v, int64_t G, int64_t L, int64_t hd, float scale, float* out,
                float* p) {
  for (int64_t g = 0; g < G; ++g, q += hd, out += hd, p += L) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) {
      const T* kj = k + j * hd;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= hd; i += 8)
        for (int t = 0; t < 8; ++t) acc[t] += q[i + t] * widen(kj[i + t]);
      for (; i < hd; ++i) acc[0] += q[i] * widen(kj[i]);
      p[j] = (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) * scale;
      mx = std::max(mx, p[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) sum += (p[j] = std::exp(p[j] - mx));
    for (int64_t d = 0; d < hd; ++d) out[d] = 0.f;
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < L; ++j) {
      const float w = p[j] * inv;
      const T* vj = v + j * hd;
      for (int64_t d = 0; d < hd; ++d) out[d] += w * widen(vj[d]);
    }
  }
}
}  // namespace

void attend_ref(const float* q, const float* k, const float* v, int64_t G, int64_t L, int64_t hd, float scale,
                float* out, float* p) {
  attend_any(q, k, v, G, L, hd, scale, out, p);
}

void attend_f16_ref(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t L, int64_t hd,
                    float scale, float* out, float* p) {
  attend_any(q, k, v, G, L, hd, scale, out, p);
}

void silu_mul_ref(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

namespace {

const KernelSet kSet{"scalar", 4, /*max_tiles=*/1, XForm::kPlain, nullptr, gemv, dequant, nullptr, gemv_f16};

}  // namespace

const KernelSet* scalar_kernels() { return &kSet; }

}  // namespace compressor
