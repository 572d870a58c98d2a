// compressor::llama_layer: one whole decoder block of a llama-architecture model (llama, mistral,
// qwen2) on the packed kernels, in one call. Schema, fake and the pure-PyTorch reference (the test
// oracle) are in compressor/kernels/layer.py, which documents the arguments.
//
// Why a block-level op: at batch 1 a 4-bit SmolLM2-135M reads ~90 MB per token, a few milliseconds
// of DRAM time, while HF's eager forward spends as long again in ~40 Python and dispatcher calls per
// block (norms, projections, rotary, cache update, attention, residuals). Here those are plain C++:
// the projections call the kernels of ops.cpp directly (q/k/v and gate/up fused into one packed
// weight each, so one pass over x and one parallel region per pair), the rest are small loops.
// Decode (T == 1, B < 32) runs a DecodeStack in one parallel region; prompts and larger steps block_rows.
// Both are the torch-free code of block.h, which the engine (csrc/engine) runs too.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <memory>

#include <cmath>
#include <limits>
#include <vector>

#include "block.h"
#include "ops.h"

namespace compressor {
namespace {

constexpr int kLinears = 4;    // qkv, o, gate_up, down
constexpr int kPerLinear = 5;  // qweight, scales, zeros, perm, bias
constexpr int kMeta = 3 * kLinears + 3;

struct Linear {
  at::Tensor qweight, scales;
  std::optional<at::Tensor> zeros, perm, bias;
  int64_t bits, group, out;
  at::Tensor bias_f32;  // contiguous fp32, or undefined

  at::Tensor operator()(const at::Tensor& x) const {
    return quant_linear(x, qweight, scales, zeros, perm, bias, group, out, int(bits));
  }
  PackedRef ref() const { return packed_ref(qweight, scales, zeros, perm, group, out, int(bits)); }
  const float* bias_ptr() const { return bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr; }
};

// Linear i of the block whose tensors start at w[base] (llama_stack: base = 20 * block).
Linear linear_at(const c10::List<std::optional<at::Tensor>>& w, at::IntArrayRef meta, int i, int64_t base = 0) {
  const auto get = [&](int j) -> std::optional<at::Tensor> { return w.get(base + kPerLinear * i + j); };
  TORCH_CHECK(get(0) && get(1), "llama_layer: linear ", i, " needs qweight and scales");
  const std::optional<at::Tensor> bias = get(4);
  return {*get(0), *get(1), get(2), get(3), bias, meta[3 * i], meta[3 * i + 1], meta[3 * i + 2],
          bias ? bias->to(at::kFloat).contiguous() : at::Tensor()};
}

Cache cache(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kHalf}; }

// Region (block.h) on ATen's threads, with the caller's thread-local state (inference mode, grad mode).
Region aten_region() {
  return [](const std::function<void()>& fn) {
    const at::ThreadLocalState tls;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      at::ThreadLocalStateGuard guard(tls);
      fn();
    });
  };
}

// A decode step of `stack` in one parallel region on ATen's threads; its output (M, 1, H) as a tensor.
at::Tensor run_stack(DecodeStack& stack, const at::Tensor& x) {
  const at::ThreadLocalState tls;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(tls);
    stack.run();
  });
  const int64_t M = x.size(0), H = x.size(2);
  at::Tensor h = at::empty({M, 1, H}, x.options());
  std::memcpy(h.data_ptr<float>(), stack.out(), M * H * sizeof(float));
  return h;
}

struct Block {
  Linear qkv, o, gu, down;
  int64_t nh, nkv, hd;
};

// The checks of llama_layer's arguments, for the block whose tensors start at w[base] and whose ints are `meta`.
Block check_block(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1, const at::Tensor& ln2,
                  const c10::List<std::optional<at::Tensor>>& w, int64_t base, at::IntArrayRef meta) {
  TORCH_CHECK(int64_t(w.size()) >= base + kLinears * kPerLinear, "llama_layer: w must hold ", kLinears * kPerLinear,
              " tensors per block (qweight, scales, zeros, perm, bias of qkv, o, gate_up, down), got ", w.size());
  TORCH_CHECK(meta.size() == kMeta, "llama_layer: meta must hold ", kMeta, " ints per block, got ", meta.size());
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "llama_layer: x must be a contiguous float32 CPU tensor (B, T, hidden), got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2);
  const int64_t nh = meta[12], nkv = meta[13], hd = meta[14];
  TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0 && hd > 0 && hd % 2 == 0,
              "llama_layer: heads=", nh, " kv_heads=", nkv, " head_dim=", hd, " are not a valid attention shape");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->dim() == 4 && (c->scalar_type() == at::kFloat || c->scalar_type() == at::kHalf) &&
                    c->scalar_type() == k_cache.scalar_type() && c->is_contiguous() && c->size(0) == B &&
                    c->size(1) == nkv && c->size(3) == hd,
                "llama_layer: caches must be contiguous float32 or float16, both the same (", B, ", ", nkv, ", S, ",
                hd, "), got ", c->scalar_type(), " ", c->sizes());
  const int64_t S = k_cache.size(2), L = pos + T;
  TORCH_CHECK(pos >= 0 && L <= S && v_cache.size(2) == S, "llama_layer: positions ", pos, "..", L - 1,
              " do not fit the cache of ", S);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= L && cos.size(1) == hd && cos.sizes() == sin.sizes() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "llama_layer: cos/sin must be contiguous float32 (>= ", L, ", ", hd, "), got ", cos.sizes());
  for (const at::Tensor* n : {&ln1, &ln2})
    TORCH_CHECK(n->dim() == 1 && n->size(0) == H && n->scalar_type() == at::kFloat && n->is_contiguous(),
                "llama_layer: norm weights must be float32 (", H, ",)");
  Block blk{linear_at(w, meta, 0, base), linear_at(w, meta, 1, base), linear_at(w, meta, 2, base),
            linear_at(w, meta, 3, base), nh, nkv, hd};
  TORCH_CHECK(blk.qkv.out == (nh + 2 * nkv) * hd && blk.o.out == H && blk.gu.out % 2 == 0 && blk.down.out == H,
              "llama_layer: projection widths (", blk.qkv.out, ", ", blk.o.out, ", ", blk.gu.out, ", ", blk.down.out,
              ") do not match hidden=", H, " heads=", nh, " kv_heads=", nkv, " head_dim=", hd);
  return blk;
}

BlockRef block_ref(const Block& b, const at::Tensor& ln1, const at::Tensor& ln2, double scale) {
  BlockRef r;
  r.qkv = b.qkv.ref(), r.o = b.o.ref(), r.gu = b.gu.ref(), r.down = b.down.ref();
  r.b_qkv = b.qkv.bias_ptr(), r.b_o = b.o.bias_ptr(), r.b_gu = b.gu.bias_ptr(), r.b_dn = b.down.bias_ptr();
  r.ln1 = ln1.data_ptr<float>(), r.ln2 = ln2.data_ptr<float>();
  r.nh = b.nh, r.nkv = b.nkv, r.hd = b.hd, r.scale = float(scale);
  return r;
}

StackLayer stack_layer(const Block& b, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& ln1,
                       const at::Tensor& ln2, double scale) {
  return {block_ref(b, ln1, ln2, scale), cache(k_cache), cache(v_cache), k_cache.size(2)};
}

// A single-token step (DecodeStack, block.h) of every block in `layers`, rows x (M, 1, H).
at::Tensor decode_stack(const at::Tensor& x, const std::vector<StackLayer>& layers, int64_t pos, const at::Tensor& cos,
                        const at::Tensor& sin, double eps) {
  DecodeStack stack(x.data_ptr<float>(), x.size(0), x.size(2), layers, pos, cos.data_ptr<float>(),
                    sin.data_ptr<float>(), eps, at::get_num_threads(), int8_rows());
  return run_stack(stack, x);
}

// Decode (one token per row, fewer than 32 rows) runs as a DecodeStack in one parallel region.
bool is_decode(const at::Tensor& x) { return x.size(1) == 1 && x.size(0) < 32; }

at::Tensor block_forward(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1, const at::Tensor& ln2,
                         const Block& blk, double eps, double scale) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), M = B * T, S = k_cache.size(2);
  if (is_decode(x)) return decode_stack(x, {stack_layer(blk, k_cache, v_cache, ln1, ln2, scale)}, pos, cos, sin, eps);

  // prompts and steps of many rows: block_rows (block.h), the code of the engine's; projections on the kernel
  // set's GEMM, or where it has none (AVX2, scalar) on quant_linear's dequantize-and-ATen-GEMM
  const BlockRef ref = block_ref(blk, ln1, ln2, scale);
  at::Tensor h = x.reshape({M, H}).clone();
  at::Tensor mem = at::empty({RowsBuffer::floats(ref, B, T, H)}, x.options());
  const RowsBuffer buf(ref, B, T, H, mem.data_ptr<float>());
  const Region region = aten_region();
  const Linear* lin[4] = {&blk.qkv, &blk.o, &blk.gu, &blk.down};
  const bool gemm = kernel_set()->gemm != nullptr;
  block_rows(ref, h.data_ptr<float>(), B, T, H, pos, cache(k_cache), cache(v_cache), S, cos.data_ptr<float>(),
             sin.data_ptr<float>(), eps, buf, region,
             [&](int i, const float* in, int64_t rows, float* out) {
               const Linear& l = *lin[i];
               if (gemm || rows < kGemmMinRows)
                 return project_rows(l.ref(), in, rows, out, buf.xp, at::get_num_threads(), int8_rows(), region);
               const int64_t K = l.qweight.size(1) * (32 / l.bits);
               const at::Tensor y = quant_linear(at::from_blob(const_cast<float*>(in), {rows, K}, x.options()),
                                                 l.qweight, l.scales, l.zeros, l.perm, std::nullopt, l.group, l.out,
                                                 int(l.bits));
               std::memcpy(out, y.data_ptr<float>(), rows * l.out * sizeof(float));
             });
  return h.view({B, T, H});
}

at::Tensor llama_layer(const at::Tensor& x, at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos,
                       const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1, const at::Tensor& ln2,
                       const c10::List<std::optional<at::Tensor>>& w, at::IntArrayRef meta, double eps,
                       double scale) {
  TORCH_CHECK(w.size() == kLinears * kPerLinear, "llama_layer: w must hold ", kLinears * kPerLinear,
              " tensors (qweight, scales, zeros, perm, bias of qkv, o, gate_up, down), got ", w.size());
  const Block blk = check_block(x, k_cache, v_cache, pos, cos, sin, ln1, ln2, w, 0, meta);
  return block_forward(x, k_cache, v_cache, pos, cos, sin, ln1, ln2, blk, eps, scale);
}

// compressor::llama_stack: the blocks of a model one after the other, as llama_layer on each, in one call. A
// decode step runs them all in one parallel region (no return to Python, no fork/join between blocks, one
// scratch buffer): per block that saves the op call and its setup (~10-15 us, 5-7% of a SmolLM2-135M token
// at batch 1). Prompts run block by block.
at::Tensor llama_stack(const at::Tensor& x, at::TensorList k_caches, at::TensorList v_caches, int64_t pos,
                       const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms,
                       const c10::List<std::optional<at::Tensor>>& w, at::IntArrayRef meta, double eps,
                       at::ArrayRef<double> scales) {
  const int64_t n = int64_t(scales.size());
  TORCH_CHECK(n > 0 && int64_t(k_caches.size()) == n && int64_t(v_caches.size()) == n &&
                  int64_t(norms.size()) == 2 * n && int64_t(w.size()) == n * kLinears * kPerLinear &&
                  int64_t(meta.size()) == n * kMeta,
              "llama_stack: for ", n, " blocks (one scale each) pass ", n, " k and v caches, ", 2 * n,
              " norms (ln1, ln2 of each), ", n * kLinears * kPerLinear, " tensors in w and ", n * kMeta,
              " ints in meta; got ", k_caches.size(), ", ", v_caches.size(), ", ", norms.size(), ", ", w.size(), ", ",
              meta.size());
  std::vector<Block> blocks;
  for (int64_t l = 0; l < n; ++l)
    blocks.push_back(check_block(x, k_caches[l], v_caches[l], pos, cos, sin, norms[2 * l], norms[2 * l + 1], w,
                                 l * kLinears * kPerLinear, meta.slice(l * kMeta, kMeta)));
  if (!is_decode(x)) {
    at::Tensor h = x;
    for (int64_t l = 0; l < n; ++l)
      h = block_forward(h, k_caches[l], v_caches[l], pos, cos, sin, norms[2 * l], norms[2 * l + 1], blocks[l], eps,
                        scales[l]);
    return h;
  }
  std::vector<StackLayer> layers;
  for (int64_t l = 0; l < n; ++l)
    layers.push_back(stack_layer(blocks[l], k_caches[l], v_caches[l], norms[2 * l], norms[2 * l + 1], scales[l]));
  return decode_stack(x, layers, pos, cos, sin, eps);
}

}  // namespace
}  // namespace compressor

TORCH_LIBRARY_IMPL(compressor, CPU, m) {
  m.impl("llama_layer", &compressor::llama_layer);
  m.impl("llama_stack", &compressor::llama_stack);
}
