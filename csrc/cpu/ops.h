// The CPU ops of ops.cpp as plain C++ functions, for other translation units that chain them
// (layer.cpp) without a trip through the dispatcher. ATen types: not for the ISA-specific files
// (kernels.h, included here, is plain C++).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <optional>
#include <vector>

#include "kernels.h"

namespace compressor {

// compressor::int4_linear / int8_linear (bits 4 or 8), see compressor/kernels/ops.py for the layout.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                        const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features, int bits);

// The decode path (M < 32 rows) of quant_linear for one projection, split into the part one thread does
// (`prepare`: act-order gather, the activations' block sums and int8 slices) and the part any number of
// threads do together (`run`: each takes chunks of output tiles from a shared counter until none are
// left; `finished` once every tile is written). quant_linear runs it in a parallel region of its own;
// layer.cpp runs a whole decoder block in one region, with no fork and join per projection.
// The tensors must be contiguous, in the layout of compressor/kernels/ops.py, and outlive the object.
class DecodeGemv {
 public:
  DecodeGemv(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
             const std::optional<at::Tensor>& perm, int64_t group_size, int64_t out_features, int bits, int64_t M,
             float* y);
  void prepare(const float* x);   // x (M, K) fp32 in the checkpoint's channel order; y is (M, N) fp32
  // Rows m0 .. m1 - 1 of prepare(x) (x still points at row 0), for threads that split the rows; every row
  // must be prepared before any thread calls run. The object must be fresh (or prepare()d before).
  void prepare_rows(const float* x, int64_t m0, int64_t m1);
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
  std::vector<float> xsum_, xscaled_, xsigma_, xperm_;
  std::vector<int8_t> xq_;
  std::atomic<int64_t> next_{0}, done_{0};
};

// The kernel set in use (ops.cpp picks it from the CPU's features; tests may force one).
const KernelSet* kernel_set();

// compressor::f16_linear.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace compressor
