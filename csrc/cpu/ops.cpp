// CPU implementations of the `compressor::int4_linear`, `int8_linear` and `f16_linear` ops.
//
// The schemas, fake implementations and pure-PyTorch references live in
// compressor/kernels/ops.py; this file only registers CPU kernels for them. Importing
// `compressor._C` is what swaps the reference out.
//
// Two regimes:
//  * M < kGemmMinRows (decode): batch-1..16 matmul is bound by reading the weight, so a tile kernel
//    streams the packed codes once and keeps up to `max_rows` activation rows in registers
//    (kernels_*.cpp), `max_tiles` tiles at a time. Threads take chunks of output tiles (each tile
//    one contiguous block of memory) from a shared counter. On AVX-512 VNNI, calls of 2-31 rows from
//    a thread that allowed it (set_int8_activations) take the set's batch gemv (int8 activations per
//    block, 16 rows per pass: kernels.h, BatchGemv), ~3x the exact three-slice gemv at 2-16 rows.
//  * M >= kGemmMinRows (prefill): the matmul is compute bound. Each thread takes whole blocks of
//    columns, dequantizes one at a time into its own buffer (fp32, or bf16 where the CPU multiplies
//    bf16 natively) and multiplies it with a single-threaded ATen GEMM (MKL / oneDNN), which beats
//    a plain hand-written loop. Independent blocks per thread scale better than one
//    shared block per multi-threaded GEMM call (4096x4096, M=64: 1.36x fp32 F.linear vs 0.81x).
//    Where the kernel set has its own GEMM (AVX-512 and AVX2, fp32 x) it is used instead: it dequantizes
//    into L1-sized panels and never writes the fp32 weight out (0.96x -> 1.1-1.6x fp32 F.linear at M=64).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "decode.h"
#include "kernels.h"
#include "ops.h"

namespace compressor {
namespace {

// Dequantized block size for the GEMM path: each thread dequantizes blocks of this size into its own
// buffer and multiplies them with a single-threaded GEMM; small enough to stay in L2/L3 meanwhile.
constexpr int64_t kGemmBlockBytes = 2 << 20;

// fn(b0, b1) over [0, n) on ATen's threads, one contiguous range each, for bodies that call ATen
// (the prefill GEMMs): workers get the caller's thread-local state (inference mode, grad mode), and
// ATen ops inside a parallel region run single-threaded.
template <typename F>
void parallel_blocks(int64_t n, const F& fn) {
  const at::ThreadLocalState tls;
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(tls);
    fn(b0, b1);
  });
}

// Test hook: force an instruction set ("avx512", "avx2", "scalar") or "auto". Refuses a set the
// CPU lacks. Returns the name now in use.
std::string set_isa(const std::string& name) {
  const KernelSet* best = best_kernel_set();
  const KernelSet* ks = nullptr;
  if (name == "auto") ks = best;
  else if (name == "scalar") ks = scalar_kernels();
  else if (name == "avx2") ks = (best == scalar_kernels()) ? nullptr : avx2_kernels();
  else if (name == "avx512") ks = (best == avx512_kernels()) ? best : nullptr;
  TORCH_CHECK(ks, "instruction set '", name, "' is unknown or not supported by this CPU (best is ", best->name, ")");
  use_kernel_set(ks);
  return ks->name;
}

std::string isa() { return kernel_set()->name; }

// Whether decode calls made on this thread may take the kernel set's batch gemv (int8 activations at
// 2-31 rows, kernels.h): off unless the caller turns it on, as compressor.nn.decoder.FastDecoder does for
// its batched single-token steps (compressor.kernels.int8_activations). Thread-local: DecodeGemv reads
// it where it is built, on the calling thread, before any worker runs.
thread_local bool t_int8 = false;
bool set_int8_activations(bool on) {
  const bool prev = t_int8;
  t_int8 = on;
  return prev;
}
// The fewest rows that take int8 activations on this thread now; 0: none (off, or no batch gemv here).
int64_t batch_min_rows(const KernelSet* ks) { return t_int8 && ks->batch.gemv ? ks->batch.min_rows : 0; }

}  // namespace

namespace {

at::Tensor dq_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features,
                     int bits) {
  const int P = 32 / bits;
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t K = x.size(-1), N = out_features;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 3 && qweight.size(2) == kTileN,
              "qweight must be int32 (N/", kTileN, ", K/", P, ", ", kTileN, "), got ", qweight.sizes());
  const int64_t Nt = qweight.size(0);
  TORCH_CHECK(N > 0 && Nt == (N + kTileN - 1) / kTileN, "out_features=", N, " needs ",
              (N + kTileN - 1) / kTileN, " tiles of ", kTileN, " columns, qweight has ", Nt);
  TORCH_CHECK(K % P == 0 && qweight.size(1) == K / P, "in_features=", K, " (x.size(-1)) must be a multiple of ", P,
              " and match qweight.size(1)*", P, "=", qweight.size(1) * P);
  const int64_t group = group_size == -1 ? K : group_size;
  TORCH_CHECK(group > 0 && K % group == 0 && group % P == 0, "group_size=", group_size,
              " must be -1 or a multiple of ", P, " that divides in_features=", K);
  const int64_t G = K / group;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.sizes() == at::IntArrayRef({Nt, G, kTileN}),
              "scales must be float16 (", Nt, ", ", G, ", ", kTileN, "), got ", scales.scalar_type(), " ", scales.sizes());
  if (zeros)
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->sizes() == scales.sizes(),
                "zeros must be float16 with the shape of scales ", scales.sizes(), ", got ", zeros->sizes());
  if (perm)
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->dim() == 1 && perm->size(0) == K,
                "perm must be int64 (", K, ",), got ", perm->scalar_type(), " ", perm->sizes());
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be (", N, ",), got ", bias->sizes());
  for (const at::Tensor* t : {&x, &qweight, &scales})
    TORCH_CHECK(t->device().is_cpu(), "compressor kernels run on CPU tensors only");

  const at::Tensor qw = qweight.contiguous(), sc = scales.contiguous();
  const at::Tensor zp = zeros ? zeros->contiguous() : at::Tensor();
  at::Tensor x2 = x.reshape({-1, K});
  if (perm) x2 = x2.index_select(1, *perm);  // act-order: channels were sorted by group at repack
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;

  const KernelSet* ks = kernel_set();
  const PackedRef w = packed_ref(qw, sc, zeros ? std::optional<at::Tensor>(zp) : std::nullopt, std::nullopt, group_size,
                                 N, bits);
  const auto tile = [&](int64_t t) { return tile_args(w, t); };

  if (M < kGemmMinRows) {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({M, N}, xf.options());
    DecodeGemv g(w, M, y.data_ptr<float>(), at::get_num_threads(), t_int8);
    g.prepare(xf.data_ptr<float>());
    at::parallel_for(0, g.workers(), 1, [&](int64_t, int64_t) { g.run(); });
    if (bias) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type()).reshape(out_shape);
  }

  // Prefill: dequantize column blocks into (K, cols) W^T and hand them to the GEMM. The GEMM runs
  // in bf16 only where the CPU multiplies bf16 natively; elsewhere (AVX2, AVX-512 without BF16) a
  // bf16 GEMM is emulated and ~40x slower than fp32, so bf16 activations are widened (exactly).
  const bool bf16 = x.scalar_type() == at::kBFloat16 && __builtin_cpu_supports("avx512bf16");
  const at::Tensor xin = bf16 ? x2.contiguous() : x2.to(at::kFloat).contiguous();
  const int64_t elem = bf16 ? 2 : 4;
  if (!bf16 && ks->gemm) {
    // The kernel set's own GEMM, dequantizing on the fly (kernels_avx512.cpp, kernels_avx2.cpp): tiles split between
    // threads; a tail tile narrower than kTileN goes through a scratch block.
    const float* xp = xin.data_ptr<float>();
    at::Tensor y = at::empty({M, N}, xin.options());
    float* yp = y.data_ptr<float>();
    // Threads take tiles from a shared counter, as in decode: on a shared machine one core is often
    // slower for a while, and a static half each leaves the other one waiting.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      std::vector<float> scratch;
      gemm_tiles(ks, w, xp, M, yp, next, scratch);
    });
    if (bias) y.add_(bias->to(y.scalar_type()));
    return y.to(x.scalar_type()).reshape(out_shape);
  }

  // Each thread takes whole column blocks: dequantizes one into its own buffer and multiplies it with
  // a single-threaded GEMM. Blocks small enough to stay in cache, and at least one per thread.
  const int64_t threads = at::get_num_threads();
  const int64_t tiles_per_block = std::max<int64_t>(
      1, std::min<int64_t>((Nt + threads - 1) / threads, kGemmBlockBytes / (K * elem * kTileN)));
  const int64_t n_blocks = (Nt + tiles_per_block - 1) / tiles_per_block;
  const int64_t ld = tiles_per_block * kTileN;
  at::Tensor y = at::empty({M, N}, xin.options());
  parallel_blocks(n_blocks, [&](int64_t b0, int64_t b1) {
    at::Tensor wbuf = at::empty({K, ld}, xin.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * tiles_per_block, nb = std::min(tiles_per_block, Nt - t0);
      for (int64_t i = 0; i < nb; ++i)
        ks->dequant(tile(t0 + i), static_cast<char*>(wbuf.data_ptr()) + i * kTileN * elem, ld, bf16);
      const int64_t cols = std::min(nb * kTileN, N - t0 * kTileN);
      at::Tensor yb = y.narrow(1, t0 * kTileN, cols);
      at::mm_out(yb, xin, wbuf.narrow(1, 0, cols));   // one thread: we are inside parallel_for
    }
  });
  if (bias) y.add_(bias->to(y.scalar_type()));
  return y.to(x.scalar_type()).reshape(out_shape);
}

// y = x @ weight.T + bias for an fp16 weight (N, K) and fp32/bf16 x, accumulating in fp32: exactly the
// products of the fp32 model whose weight was loaded from fp16, without reading 4 bytes per weight.
at::Tensor f16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be float32 or bfloat16 with at least one dimension, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kHalf && weight.dim() == 2, "weight must be float16 (N, K), got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x.size(-1)=", K, " does not match weight.size(1)=", weight.size(1));
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be (", N, ",), got ", bias->sizes());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "compressor kernels run on CPU tensors only");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor w = weight.contiguous();
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M < kGemmMinRows) {
    const KernelSet* ks = kernel_set();
    const float* xp = xf.data_ptr<float>();
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (2 * K));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += kF16MaxRows)
        ks->gemv_f16(xp + m0 * K, K, int(std::min<int64_t>(kF16MaxRows, M - m0)), wp + n0 * K, K, n1 - n0,
                     yp + m0 * N + n0, N);
    });
  } else {
    // Prefill: widen blocks of rows to fp32 (exact) and multiply them with one GEMM per thread.
    const int64_t threads = at::get_num_threads();
    const int64_t rows_per_block = std::max<int64_t>(
        1, std::min<int64_t>((N + threads - 1) / threads, kGemmBlockBytes / (4 * K)));
    const int64_t n_blocks = (N + rows_per_block - 1) / rows_per_block;
    parallel_blocks(n_blocks, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * rows_per_block, rows = std::min(rows_per_block, N - n0);
        at::Tensor yb = y.narrow(1, n0, rows);
        at::mm_out(yb, xf, w.narrow(0, n0, rows).to(at::kFloat).t());
      }
    });
  }
  if (bias) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features) {
  return dq_linear(x, qweight, scales, zeros, perm, bias, group_size, out_features, 4);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features) {
  return dq_linear(x, qweight, scales, zeros, perm, bias, group_size, out_features, 8);
}

// Benchmark probe: read every byte of `buf` once and return a checksum, each thread walking its
// share as `streams` interleaved sequential streams (chunks of 64 KiB, as the gemv walks its tiles).
// One core gets ~11 GB/s from one stream and ~18 GB/s from eight on a Xeon: bench_kernels reports
// the best of several probes as the machine's read bandwidth.
int64_t stream_read(const at::Tensor& buf, int64_t streams) {
  TORCH_CHECK(buf.is_contiguous() && buf.scalar_type() == at::kInt && streams >= 1, "stream_read: contiguous int32");
  const int32_t* p = buf.data_ptr<int32_t>();
  constexpr int64_t kChunk = 16384;  // int32s per stream chunk (64 KiB)
  const int64_t span = kChunk * streams, n_spans = buf.numel() / span;
  std::atomic<int64_t> total{0};
  at::parallel_for(0, n_spans, 1, [&](int64_t s0, int64_t s1) {
    uint32_t acc[16] = {};  // wraps: only a checksum
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t i = 0; i < kChunk; i += 16)
        for (int64_t j = 0; j < streams; ++j)
          for (int l = 0; l < 16; ++l) acc[l] += p[s * span + j * kChunk + i + l];
    int64_t sum = 0;
    for (int l = 0; l < 16; ++l) sum += acc[l];
    total += sum;
  });
  return total.load();
}

}  // namespace

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                        const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features, int bits) {
  return dq_linear(x, qweight, scales, zeros, perm, bias, group_size, out_features, bits);
}

PackedRef packed_ref(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                     const std::optional<at::Tensor>& perm, int64_t group_size, int64_t out_features, int bits) {
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && (!zeros || zeros->is_contiguous()) &&
                  (!perm || perm->is_contiguous()), "the packed tensors must be contiguous");
  PackedRef w;
  w.bits = bits;
  w.K = qweight.size(1) * (32 / bits);
  w.Nt = qweight.size(0);
  w.N = out_features;
  w.group = group_size == -1 ? w.K : group_size;
  w.qw = qweight.data_ptr<int32_t>();
  w.sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  w.zp = zeros ? reinterpret_cast<const uint16_t*>(zeros->data_ptr<at::Half>()) : nullptr;
  w.perm = perm ? perm->data_ptr<int64_t>() : nullptr;
  return w;
}

bool int8_rows() { return t_int8; }

int64_t batch_rows() { return batch_min_rows(kernel_set()); }

bool int8_supported() { return kernel_set()->batch.gemv != nullptr; }

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return f16_linear(x, weight, bias);
}

// The kernel set's ToHalfFn (the fp16 KV cache's rows) on a contiguous float32 tensor: its fp16 bits as int16.
at::Tensor to_half_bits(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "_to_half: a contiguous float32 tensor");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kShort));
  kernel_set()->to_half(x.data_ptr<float>(), x.numel(), reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>()));
  return out;
}

// The kernel set's decode attention (AttendFn, or AttendF16Fn for a cache of fp16 bits as int16) of G query heads
// q (G, hd) over one KV head's first L rows k, v (L, hd): out (G, hd) float32.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 2 && q.is_contiguous(), "_attend: q a contiguous float32 (G, hd)");
  const int64_t G = q.size(0), hd = q.size(1), L = k.size(0);
  const bool half = k.scalar_type() == at::kShort;
  TORCH_CHECK((half || k.scalar_type() == at::kFloat) && k.scalar_type() == v.scalar_type() && k.is_contiguous() &&
                  v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 2 && k.size(1) == hd && L > 0,
              "_attend: k and v contiguous (L, hd), L > 0, both float32 or both int16 (fp16 bits)");
  at::Tensor out = at::empty_like(q);
  std::vector<float> p(G * L);
  if (half)
    kernel_set()->attend_f16(q.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k.data_ptr<int16_t>()),
                             reinterpret_cast<const uint16_t*>(v.data_ptr<int16_t>()), G, L, hd, float(scale),
                             out.data_ptr<float>(), p.data());
  else
    kernel_set()->attend(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), G, L, hd, float(scale),
                         out.data_ptr<float>(), p.data());
  return out;
}

}  // namespace compressor

TORCH_LIBRARY_IMPL(compressor, CPU, m) {
  m.impl("int4_linear", &compressor::int4_linear);
  m.impl("int8_linear", &compressor::int8_linear);
  m.impl("f16_linear", &compressor::f16_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "compressor CPU dequant-matmul kernels (registers compressor::int4_linear / int8_linear)";
  m.def("isa", &compressor::isa, "instruction set the kernels use");
  m.def("_set_isa", &compressor::set_isa, "force 'avx512', 'avx2', 'scalar' or 'auto' (tests)");
  m.def("batch_rows", &compressor::batch_rows,
        "calls from this thread with at least this many rows (and < 32) take int8 activations now; 0: none");
  m.def("int8_supported", &compressor::int8_supported, "whether this CPU's kernel set has the int8 batch gemv");
  m.def("_set_int8_activations", &compressor::set_int8_activations,
        "allow int8 activations at 2-31 rows for calls from this thread; returns the previous setting");
  m.def("_to_half", &compressor::to_half_bits, "the kernel set's fp32 -> fp16 row conversion, as int16 bits (tests)");
  m.def("_attend", &compressor::attend, "the kernel set's decode attention of G heads over one KV head (tests)");
  m.def("_stream_read", &compressor::stream_read, "benchmark probe: read an int32 tensor as N streams per thread");
}
