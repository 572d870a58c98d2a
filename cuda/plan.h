// Launch plan of cuda/dq_gemm.cu: plain C++, no CUDA headers, so it is compiled and tested on the CPU too
// (tests/kernels/test_cuda_plan.py builds it with g++ and compares it with compressor/kernels/cuda_plan.py).
#pragma once

namespace compressor {

constexpr int kThreads = 128, kWarps = 4;        // one block: 4 warps
constexpr int kBN = 128, kBK = 64;               // columns (4 tiles of 32) and k per step
constexpr int kDecodeBM = 16, kDecodeWarpsM = 1;     // M <= 16: one row tile, 4 warps across N
constexpr int kPrefillBM = 64, kPrefillWarpsM = 2;   // M > 16: 2 x 2 warps of 32 x 64
constexpr int kDecodeBlocksPerSM = 4, kPrefillBlocksPerSM = 2;   // split K until the grid has this many

struct Plan {
  int bm;                  // rows per block: kDecodeBM or kPrefillBM
  int grid_x, grid_y;      // column blocks (kBN), row blocks (bm)
  int splits;              // gridDim.z: K ranges, summed by atomicAdd when > 1
  int steps_per_split;     // kBK steps of K per block
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// M rows of x (M >= 1), K in_features, N out_features, on a GPU with `sms` multiprocessors.
inline Plan make_plan(int M, int K, int N, int sms) {
  Plan p;
  const bool decode = M <= kDecodeBM;
  p.bm = decode ? kDecodeBM : kPrefillBM;
  p.grid_x = ceil_div(ceil_div(N, 32) * 32, kBN);
  p.grid_y = ceil_div(M, p.bm);
  const int steps = ceil_div(K, kBK);
  const int want = (decode ? kDecodeBlocksPerSM : kPrefillBlocksPerSM) * sms;
  int splits = ceil_div(want, p.grid_x * p.grid_y);
  splits = splits < 1 ? 1 : (splits > steps ? steps : splits);
  p.steps_per_split = ceil_div(steps, splits);
  p.splits = ceil_div(steps, p.steps_per_split);
  return p;
}

}  // namespace compressor
