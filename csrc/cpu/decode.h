// The torch-free core of the CPU path: kernel-set selection, the decode gemv (DecodeGemv) and the prefill
// GEMM's per-thread body, on raw pointers. ops.cpp and layer.cpp (the torch ops) wrap them in ATen
// tensors and ATen's threads; csrc/engine/engine.cpp (compressor.runtime's engine, no torch in the
// process) in plain arrays and OpenMP. Plain C++: no ATen header may be included here.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace compressor {

// The kernel set in use: the best this CPU runs (cpuid, once), or the one use_kernel_set forced (tests).
const KernelSet* kernel_set();
const KernelSet* best_kernel_set();
void use_kernel_set(const KernelSet* ks);

// A packed weight in the layout of compressor/kernels/ops.py (kernels.h): qw (Nt, K / P, kTileN) int32,
// sc and zp (Nt, G, kTileN) fp16 bits (zp null: symmetric), perm (K,) int64 or null (act-order: x is
// gathered by it first). group: channels per group (K for per-channel). N: output columns (<= Nt * kTileN).
struct PackedRef {
  const int32_t* qw = nullptr;
  const uint16_t* sc = nullptr;
  const uint16_t* zp = nullptr;
  const int64_t* perm = nullptr;
  int64_t K = 0, Nt = 0, N = 0, group = 0;
  int bits = 4;
};

// The decode path (M < 32 rows) of one projection, split into the part one thread does (`prepare`:
// act-order gather, the activations' block sums and int8 slices) and the part any number of threads do
// together (`run`: each takes chunks of output tiles from a shared counter until none are left;
// `finished` once every tile is written). ops.cpp runs it in a parallel region of its own; DecodeBlock
// (block.h) runs a whole decoder block in one region, with no fork and join per projection.
// `threads`: the threads that may run it (small layers use fewer: `workers`). `int8`: rows >= the kernel
// set's batch.min_rows take its int8-activation batch gemv (kernels.h, BatchGemv). The weight must outlive it.
class DecodeGemv {
 public:
  // `mem`: scratch_bytes(w, M, int8) bytes, 64-byte aligned, for the activations' buffers (they need no
  // zeroing), kept by the caller until the last run; null: the object allocates them.
  DecodeGemv(const PackedRef& w, int64_t M, float* y, int threads, bool int8, char* mem = nullptr);
  static int64_t scratch_bytes(const PackedRef& w, int64_t M, bool int8);
  void prepare(const float* x);   // x (M, K) fp32 in the checkpoint's channel order; y is (M, N) fp32
  // Rows m0 .. m1 - 1 of prepare(x) (x still points at row 0), for threads that split the rows; every row
  // must be prepared before any thread calls run. The object must be fresh (or prepare()d before).
  void prepare_rows(const float* x, int64_t m0, int64_t m1);
  // The int8 batch path prepares by blocks of channels instead: part i of parts() (x still at row 0) for every
  // row (the rows of a word share a cache line there; two threads preparing rows passed every line to each
  // other: +5.6% at batch 8 by parts, paired). 0 parts: prepare by rows.
  int64_t parts() const { return batch_ ? std::min<int64_t>(2, NB_) : 0; }
  void prepare_part(const float* x, int64_t i);
  void run();
  bool finished() const;
  int64_t workers() const { return workers_; }
  // Start loading the act-order permutation (if any) into the cache: it is read once per token, so it
  // comes from DRAM, and prepare_rows's gather waits on it.
  void prefetch_perm() const;

 private:
  const KernelSet* ks_;
  int64_t M_, N_, K_ = 0, Nt_ = 0, G_ = 0, NB_ = 0, workers_ = 1, chunk_ = 1, rows_ = 1;
  bool batch_ = false;  // int8 activations (KernelSet::batch)
  float* y_;
  const int32_t* qw_ = nullptr;
  const uint16_t* sc_ = nullptr;
  const uint16_t* zp_ = nullptr;
  const int64_t* perm_ = nullptr;
  const float* xg_ = nullptr;
  TileArgs base_;
  std::unique_ptr<char[]> own_;  // the buffers below when the caller gave no memory
  float *xsum_ = nullptr, *xscaled_ = nullptr, *xsigma_ = nullptr, *xperm_ = nullptr;
  int8_t* xq_ = nullptr;
  std::atomic<int64_t> next_{0}, done_{0};
};

constexpr int64_t kMinBytesPerThread = 32 << 10;  // packed bytes below which a layer stays on one thread

// Rows at or above which a projection is a prefill GEMM rather than a DecodeGemv.
constexpr int64_t kGemmMinRows = 32;

// The prefill GEMM of a kernel set that has one (KernelSet::gemm), y (M, N) = x (M, K) W, x already in
// the packed channel order: the part one thread of a region runs. Threads take tiles from `next`
// (start at 0) until none are left; `scratch` is the thread's own (a tail tile narrower than kTileN).
void gemm_tiles(const KernelSet* ks, const PackedRef& w, const float* x, int64_t M, float* y,
                std::atomic<int64_t>& next, std::vector<float>& scratch);

// The tile arguments of tile t of w (qw, sc, zp and the shape fields; x, y and the rest unset).
TileArgs tile_args(const PackedRef& w, int64_t t);

}  // namespace compressor
