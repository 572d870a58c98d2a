// The torch-free core declared in decode.h. ops.cpp explains the two regimes (decode gemv, prefill GEMM).
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

namespace compressor {
namespace {

constexpr int kMaxBatchRows = 16;  // DecodeGemv::run's output block
// decode: packed bytes a thread takes from the queue at once. SmolLM2's layers are 0.2-1 MB: 256 KB chunks left
// one thread with most of a layer (all 120 projections of a token: 14.5 GB/s at 32 KB, 9.5 at 256 KB).
constexpr int64_t kChunkBytes = 32 << 10;

// Sum of n floats with eight independent partial sums: a single running sum is one dependent add
// per element (~4 cycles each, 16 us for K = 4096), this the compiler vectorizes.
float block_sum(const float* x, int64_t n) {
  float acc[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int i = 0; i < 8; ++i) acc[i] += x[k + i];
  for (; k < n; ++k) acc[0] += x[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

const KernelSet* detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"))
    return avx512_kernels();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return avx2_kernels();
  return scalar_kernels();
}

std::atomic<const KernelSet*> g_kernels{nullptr};

}  // namespace

const KernelSet* best_kernel_set() {
  static const KernelSet* best = detect();
  return best;
}

const KernelSet* kernel_set() {
  const KernelSet* ks = g_kernels.load(std::memory_order_relaxed);
  if (!ks) {
    ks = best_kernel_set();
    g_kernels.store(ks);
  }
  return ks;
}

void use_kernel_set(const KernelSet* ks) { g_kernels.store(ks); }

TileArgs tile_args(const PackedRef& w, int64_t t) {
  const int P = 32 / w.bits;
  const int64_t G = w.K / w.group;
  TileArgs a{};
  a.K = w.K;
  a.G = G;
  a.group = w.group;
  a.bits = w.bits;
  a.qw = w.qw + t * (w.K / P) * kTileN;
  a.sc = w.sc + t * G * kTileN;
  a.zp = w.zp ? w.zp + t * G * kTileN : nullptr;
  return a;
}

void gemm_tiles(const KernelSet* ks, const PackedRef& w, const float* x, int64_t M, float* y,
                std::atomic<int64_t>& next, std::vector<float>& scratch) {
  for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < w.Nt;) {
    TileArgs a = tile_args(w, t);
    a.x = x;
    a.ldx = w.K;
    const int64_t cols = std::min<int64_t>(kTileN, w.N - t * kTileN);
    if (cols == kTileN) {
      a.y = y + t * kTileN;
      a.ldy = w.N;
    } else {
      scratch.resize(M * kTileN);
      a.y = scratch.data();
      a.ldy = kTileN;
    }
    ks->gemm(a, M);
    if (cols < kTileN)
      for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * w.N + t * kTileN, a.y + m * kTileN, cols * sizeof(float));
  }
}

namespace {

// Channels per partial sum of the decode gemv: blocks of <= 256 channels that divide the group (kernels.h explains).
int64_t sum_block(const PackedRef& w) {
  const int P = 32 / w.bits;
  int64_t block = std::min<int64_t>(w.group, 256) / P * P;
  while (w.group % block) block -= P;
  return block;
}

bool takes_batch(const KernelSet* ks, int64_t M, bool int8) { return int8 && ks->batch.gemv && M >= ks->batch.min_rows; }

// Byte offsets of DecodeGemv's buffers in one piece of memory, each 64-byte aligned (-1: not needed).
struct GemvLayout {
  int64_t xsum = -1, xsigma = -1, xperm = -1, xscaled = -1, xq = -1, total = 0;
  GemvLayout(const KernelSet* ks, const PackedRef& w, int64_t M, bool int8) {
    const int64_t NB = w.K / sum_block(w);
    const bool batch = takes_batch(ks, M, int8);
    const auto take = [&](int64_t bytes) { const int64_t at = total; total += (bytes + 63) / 64 * 64; return at; };
    xsum = take(M * NB * 4);
    xsigma = take(M * NB * 4);
    if (w.perm) xperm = take(M * w.K * 4);
    if (!batch && ks->xform == XForm::kScaled) xscaled = take(M * w.K * 4);
    if (batch) xq = take(M * w.K);
    else if (ks->xform == XForm::kInt8x3) xq = take(M * 3 * w.K);
  }
};

}  // namespace

int64_t DecodeGemv::scratch_bytes(const PackedRef& w, int64_t M, bool int8) {
  return GemvLayout(kernel_set(), w, M, int8).total;
}

DecodeGemv::DecodeGemv(const PackedRef& w, int64_t M, float* y, int threads, bool int8, char* mem)
    : ks_(kernel_set()), M_(M), N_(w.N), y_(y) {
  const int P = 32 / w.bits;
  K_ = w.K;
  Nt_ = w.Nt;
  const int64_t group = w.group;
  G_ = K_ / group;
  base_ = TileArgs{};
  base_.K = K_;
  base_.G = G_;
  base_.group = group;
  base_.bits = w.bits;
  qw_ = w.qw;
  sc_ = w.sc;
  zp_ = w.zp;
  perm_ = w.perm;
  base_.block = sum_block(w);
  NB_ = K_ / base_.block;
  // Waking a second thread costs a few microseconds, as much as streaming ~100 KB, so small layers
  // (e.g. a 576x192 projection) stay on one thread.
  const int64_t tile_bytes = (K_ / P) * kTileN * 4 + 2 * G_ * kTileN * 2;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / tile_bytes);
  workers_ = std::max<int64_t>(1, std::min<int64_t>(threads, (Nt_ + grain - 1) / grain));
  // Threads take chunks of tiles from a shared counter instead of one fixed share each: on a shared
  // machine one core is often slower for a while, and a static split leaves the other one idle.
  // A whole number of max_tiles per chunk (the least a claim takes, see run): the kernel streams that many
  // tiles at once.
  chunk_ = (std::max<int64_t>(1, kChunkBytes / tile_bytes) + ks_->max_tiles - 1) / ks_->max_tiles * ks_->max_tiles;
  batch_ = takes_batch(ks_, M, int8);
  rows_ = batch_ ? ks_->batch.max_rows : ks_->max_rows;
  // Buffers for prepare_rows, sized once: threads preparing different rows never reallocate them. The caller's
  // memory where it gives some (DecodeBlock: one piece kept from step to step; fresh allocations of an act-order
  // model's gathered rows came from new pages every step).
  const GemvLayout at(ks_, w, M, int8);
  if (!mem) {
    own_.reset(new char[at.total + 64]);
    mem = own_.get() + (-reinterpret_cast<intptr_t>(own_.get()) & 63);
  }
  const auto place = [mem](int64_t off) { return off < 0 ? nullptr : mem + off; };
  xsum_ = reinterpret_cast<float*>(place(at.xsum));
  xsigma_ = reinterpret_cast<float*>(place(at.xsigma));
  xperm_ = reinterpret_cast<float*>(place(at.xperm));
  xscaled_ = reinterpret_cast<float*>(place(at.xscaled));
  xq_ = reinterpret_cast<int8_t*>(place(at.xq));
  if (!batch_ && ks_->xform == XForm::kScaled) xg_ = xscaled_;
  else if (!batch_ && perm_) xg_ = xperm_;
  if (ks_->max_rows > 4 || ks_->max_tiles > 4 || ks_->batch.max_rows > kMaxBatchRows)
    throw std::logic_error(std::string("kernel set ") + ks_->name + " exceeds the output block");
}

void DecodeGemv::prepare(const float* x) {
  prepare_rows(x, 0, M_);
  next_.store(0, std::memory_order_relaxed);
  done_.store(0, std::memory_order_release);
}

void DecodeGemv::prepare_rows(const float* x, int64_t m0, int64_t m1) {
  const int P = 32 / base_.bits, bits = base_.bits;
  const int64_t K = K_, M = m1 - m0, block = base_.block, NB = NB_;
  x += m0 * K;
  if (perm_) {  // act-order: channels were sorted by group at repack
    float* xp = xperm_ + m0 * K;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xp[m * K + k] = x[m * K + perm_[k]];
    x = xp;
  }
  float* xsum = xsum_ + m0 * NB;
  if (batch_) {  // one int8 slice per block (kernels.h, PrepX1Fn); prep writes the sums. DecodeBlock's threads
    // prepare the batch path by parts of the channels instead (prepare_part): the rows of a word share a line.
    ks_->batch.prep(x, M, K, block, bits, xq_ + m0 * P, M_, xsigma_ + m0 * NB, xsum);
    return;
  }
  if (ks_->xform != XForm::kInt8x3)  // there prep_x writes the sums of the slices
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < NB; ++b) xsum[m * NB + b] = block_sum(x + m * K + b * block, block);
  if (ks_->xform == XForm::kScaled) {
    float pow2[8];
    for (int j = 0; j < P; ++j) pow2[j] = j == P - 1 ? 1.0f : std::ldexp(1.0f, -bits * j);
    float* xs = xscaled_ + m0 * K;
    for (int64_t i = 0; i < M * K; ++i) xs[i] = x[i] * pow2[i % P];
  } else if (ks_->xform == XForm::kInt8x3) {
    ks_->prep_x(x, M, K, block, bits, xq_ + m0 * 3 * K, xsigma_ + m0 * NB, xsum);
  } else if (m0 == 0) {
    xg_ = x;  // kPlain reads x in place (rows m0.. of the same buffer)
  }
}

void DecodeGemv::prepare_part(const float* x, int64_t i) {
  const int P = 32 / base_.bits, bits = base_.bits;
  const int64_t K = K_, NB = NB_, block = base_.block, n = parts();
  const int64_t b0 = NB * i / n, b1 = NB * (i + 1) / n, k0 = b0 * block, k1 = b1 * block;
  for (int64_t m = 0; m < M_; ++m) {
    const float* xr = x + m * K;
    if (perm_) {
      float* xp = xperm_ + m * K;
      for (int64_t k = k0; k < k1; ++k) xp[k] = xr[perm_[k]];
      xr = xp;
    }
    ks_->batch.prep(xr + k0, 1, k1 - k0, block, bits, xq_ + m * P + k0 / P * M_ * P, M_, xsigma_ + m * NB + b0,
                    xsum_ + m * NB + b0);
  }
}

void DecodeGemv::run() {
  const int P = 32 / base_.bits;
  const int64_t K = K_, N = N_, NB = NB_, G = G_, Nt = Nt_;
  // (rows, tiles * kTileN): the output of the tiles one call streams, before the N tail is cut
  alignas(64) float out[kMaxBatchRows * 4 * kTileN];
  for (;;) {
    // Guided: a claim takes half of a thread's share of what is left, at least chunk_ tiles. Long contiguous
    // runs first (the prefetchers' streams), small ones at the end (the threads finish together). At 8 rows,
    // where a 4-tile chunk is ~5 us of multiply-adds and o/down have 18 tiles, fixed chunks left one thread
    // waiting most of a chunk per projection: paired in one process, +6% at batch 8, batch 1 unchanged.
    int64_t t0 = next_.load(std::memory_order_relaxed), size;
    do {
      size = std::max<int64_t>(chunk_, (Nt - t0) / (2 * workers_));
    } while (t0 < Nt && !next_.compare_exchange_weak(t0, t0 + size, std::memory_order_relaxed));
    if (t0 >= Nt) break;
    const int64_t t_end = std::min(Nt, t0 + size);
    for (int64_t t = t0; t < t_end;) {
      const int tiles = int(std::min<int64_t>(ks_->max_tiles, t_end - t));
      TileArgs a = base_;
      a.qw = qw_ + t * (K / P) * kTileN;
      a.sc = sc_ + t * G * kTileN;
      a.zp = zp_ ? zp_ + t * G * kTileN : nullptr;
      a.ldx = K;
      const int64_t cols = std::min<int64_t>(tiles * kTileN, N - t * kTileN);
      const bool direct = cols == tiles * kTileN;  // else through `out`, cut to the N tail
      a.ldy = direct ? N : tiles * kTileN;
      for (int64_t m0 = 0; m0 < M_; m0 += rows_) {
        const int rows = int(std::min<int64_t>(rows_, M_ - m0));
        a.x = xg_ ? xg_ + m0 * K : nullptr;
        a.xsum = xsum_ + m0 * NB;
        a.xq = batch_ ? xq_ + m0 * P : xq_ + m0 * 3 * K;
        if (batch_) a.ldx = M_ * P;  // rows interleaved per word (kernels.h, PrepX1Fn)
        a.xsigma = xsigma_ + m0 * NB;
        a.y = direct ? y_ + m0 * N + t * kTileN : out;
        (batch_ ? ks_->batch.gemv : ks_->gemv)(a, rows, tiles);
        if (!direct)
          for (int r = 0; r < rows; ++r)
            std::memcpy(y_ + (m0 + r) * N + t * kTileN, out + r * a.ldy, cols * sizeof(float));
      }
      t += tiles;
    }
    done_.fetch_add(t_end - t0, std::memory_order_acq_rel);
  }
}

void DecodeGemv::prefetch_perm() const {
  if (!perm_) return;
  for (int64_t k = 0; k < K_; k += 64 / sizeof(int64_t)) __builtin_prefetch(perm_ + k, 0, 3);
}

bool DecodeGemv::finished() const { return done_.load(std::memory_order_acquire) >= Nt_; }

}  // namespace compressor
