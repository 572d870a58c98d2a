// compressor::llama_layer: one whole decoder block of a llama-architecture model (llama, mistral,
// qwen2) on the packed kernels, in one call. Schema, fake and the pure-PyTorch reference (the test
// oracle) are in compressor/kernels/layer.py, which documents the arguments.
//
// Why a block-level op: at batch 1 a 4-bit SmolLM2-135M reads ~90 MB per token, a few milliseconds
// of DRAM time, while HF's eager forward spends as long again in ~40 Python and dispatcher calls per
// block (norms, projections, rotary, cache update, attention, residuals). Here those are plain C++:
// the projections call the kernels of ops.cpp directly (q/k/v and gate/up fused into one packed
// weight each, so one pass over x and one parallel region per pair), the rest are small loops.
// Prefill (T > 1) takes ATen's scaled_dot_product_attention; decode (T == 1) a hand loop over
// the cache, which for one query row is cheaper than SDPA's setup.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <memory>

#include <cmath>
#include <limits>
#include <vector>

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

  at::Tensor operator()(const at::Tensor& x) const {
    return quant_linear(x, qweight, scales, zeros, perm, bias, group, out, int(bits));
  }
};

// Linear i of the block whose tensors start at w[base] (llama_stack: base = 20 * block).
Linear linear_at(const c10::List<std::optional<at::Tensor>>& w, at::IntArrayRef meta, int i, int64_t base = 0) {
  const auto get = [&](int j) -> std::optional<at::Tensor> { return w.get(base + kPerLinear * i + j); };
  TORCH_CHECK(get(0) && get(1), "llama_layer: linear ", i, " needs qweight and scales");
  return {*get(0), *get(1), get(2), get(3), get(4), meta[3 * i], meta[3 * i + 1], meta[3 * i + 2]};
}

// yp = x * rsqrt(mean(x^2) + eps) * w over each of M rows of H (HF's LlamaRMSNorm, in fp32).
void rms_norm_into(const float* xp, const float* wp, float* yp, int64_t M, int64_t H, double eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * H;
    float acc[8] = {};
    int64_t k = 0;
    for (; k + 8 <= H; k += 8)
      for (int i = 0; i < 8; ++i) acc[i] += r[k + i] * r[k + i];
    for (; k < H; ++k) acc[0] += r[k] * r[k];
    const float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    const float inv = 1.0f / std::sqrt(ss / float(H) + float(eps));
    for (int64_t i = 0; i < H; ++i) yp[m * H + i] = wp[i] * (r[i] * inv);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor y = at::empty_like(x);
  rms_norm_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.numel() / x.size(-1), x.size(-1), eps);
  return y;
}

// HF's rotate_half rotary embedding, in place, on `heads` vectors of hd at one position.
inline void rope(float* v, int64_t heads, int64_t hd, const float* c, const float* s) {
  const int64_t h2 = hd / 2;
  for (int64_t h = 0; h < heads; ++h, v += hd)
    for (int64_t i = 0; i < h2; ++i) {
      const float a = v[i], b = v[i + h2];
      v[i] = a * c[i] - b * s[i];
      v[i + h2] = b * c[i + h2] + a * s[i + h2];
    }
}

// Decode attention work: item i of M * nh / per is row b, query heads h0 .. h0 + per - 1, which share
// one cached KV head (per divides nh / nkv); the kernel set's AttendFn (kernels.h) does the arithmetic.
// `per` = nh / nkv (each KV head read once for its query heads) when there are enough items for the
// threads, else 1 (more, smaller items: batch 1 has only nkv KV heads for 2 threads).
int64_t heads_per_item(int64_t M, int64_t nh, int64_t nkv) {
  return M * nkv >= 4 * at::get_num_threads() ? nh / nkv : 1;
}

// A K or V cache (B, nkv, S, hd), float32 or fp16 (the decoder's batched generation: half the bytes attention
// reads): rows are written from fp32 and widened back exactly by the kernel set's attention.
struct Cache {
  void* data;
  bool half;
  explicit Cache(const at::Tensor& t) : data(t.data_ptr()), half(t.scalar_type() == at::kHalf) {}
  void put(int64_t row, const float* src, int64_t hd) const {  // row: (b * nkv + g) * S + position
    if (half) {
      at::Half* d = static_cast<at::Half*>(data) + row * hd;
      for (int64_t i = 0; i < hd; ++i) d[i] = at::Half(src[i]);
    } else {
      std::memcpy(static_cast<float*>(data) + row * hd, src, hd * sizeof(float));
    }
  }
  template <typename T>
  const T* at_row(int64_t row, int64_t hd) const { return static_cast<const T*>(data) + row * hd; }
};

void attend_item(const KernelSet* ks, const float* qkv, int64_t ld_qkv, const Cache& kc, const Cache& vc, int64_t i,
                 int64_t per, int64_t nh, int64_t nkv, int64_t S, int64_t hd, int64_t L, float scale, float* out,
                 float* p) {
  const int64_t b = i / (nh / per), h0 = (i % (nh / per)) * per, row = (b * nkv + h0 / (nh / nkv)) * S;
  const float* q = qkv + b * ld_qkv + h0 * hd;
  float* o = out + b * nh * hd + h0 * hd;
  if (kc.half)
    ks->attend_f16(q, kc.at_row<uint16_t>(row, hd), vc.at_row<uint16_t>(row, hd), per, L, hd, scale, o, p);
  else
    ks->attend(q, kc.at_row<float>(row, hd), vc.at_row<float>(row, hd), per, L, hd, scale, o, p);
}

// A batch too large for decode_block.
void attend_decode(const float* qkv, int64_t ld_qkv, const Cache& kc, const Cache& vc, int64_t B, int64_t nh,
                   int64_t nkv, int64_t S, int64_t hd, int64_t L, float scale, float* out) {
  const KernelSet* ks = kernel_set();
  const int64_t per = heads_per_item(B, nh, nkv), items = B * nh / per;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, per * L * hd));
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(per * L);
    for (int64_t i = i0; i < i1; ++i) attend_item(ks, qkv, ld_qkv, kc, vc, i, per, nh, nkv, S, hd, L, scale, out, p.data());
  });
}

inline void spin() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// One token per row (T == 1, B rows) of one block, run by every thread of a parallel region: each thread
// walks the same phases. The per-row phases (norms, the activations' preparation, rotary, residuals) hand
// out rows, the projections their tiles and the attention its heads through counters, and a thread that
// runs out of work waits until all of that phase is done (batch 1: one thread does a row phase, the other
// waits). No phase waits for a number of threads, so a region that runs on fewer threads than asked
// (nested, or one thread) still completes. This replaces ~10 fork/joins and ~15 ATen calls per block, and
// llama_stack runs every block of a model in one region.
//
// Everything is set up in the constructor, on the calling thread (ATen calls do not belong in the region):
// the output h (M, H), the DecodeGemvs, fp32 biases. `scratch` holds the intermediate rows; blocks that run
// one after the other in a region may share it (the last phase to read it ends before the next block starts).
class DecodeBlock {
 public:
  static int64_t scratch_floats(int64_t M, int64_t H, int64_t n_qkv, int64_t nq, int64_t I) {
    return M * (4 * H + n_qkv + nq + 3 * I);
  }

  DecodeBlock(const float* x, at::Tensor h, float* scratch, const at::Tensor& k_cache, const at::Tensor& v_cache,
              int64_t pos, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1, const at::Tensor& ln2,
              const Linear& qkv_p, const Linear& o_p, const Linear& gu_p, const Linear& down_p, int64_t nh,
              int64_t nkv, int64_t hd, double eps, double scale)
      : M(h.size(0)), H(h.size(1)), S(k_cache.size(2)), L(pos + 1), pos(pos), nh(nh), nkv(nkv), hd(hd),
        nq(nh * hd), nk(nkv * hd), n_qkv(qkv_p.out), I(gu_p.out / 2), eps(eps), scale(float(scale)), xp(x),
        h_(std::move(h)), kc(k_cache), vc(v_cache), ks(kernel_set()), per(heads_per_item(M, nh, nkv)),
        items(M * nh / per) {
    h1p = scratch;
    qkvp = h1p + M * H;
    attnp = qkvp + M * n_qkv;
    op = attnp + M * nq;
    h2p = op + M * H;
    gup = h2p + M * H;
    actp = gup + M * 2 * I;
    dnp = actp + M * I;
    hp = h_.data_ptr<float>();
    ln1p = ln1.data_ptr<float>();
    ln2p = ln2.data_ptr<float>();
    cosp = cos.data_ptr<float>() + pos * hd;
    sinp = sin.data_ptr<float>() + pos * hd;
    const auto gemv = [&](const Linear& l, float* y) {
      return std::make_unique<DecodeGemv>(l.qweight, l.scales, l.zeros, l.perm, l.group, l.out, int(l.bits), M, y);
    };
    g_qkv = gemv(qkv_p, qkvp);
    g_o = gemv(o_p, op);
    g_gu = gemv(gu_p, gup);
    g_dn = gemv(down_p, dnp);
    const auto f32 = [](const std::optional<at::Tensor>& b) { return b ? b->to(at::kFloat).contiguous() : at::Tensor(); };
    b_qkv = f32(qkv_p.bias), b_o = f32(o_p.bias), b_gu = f32(gu_p.bias), b_dn = f32(down_p.bias);
  }

  const at::Tensor& out() const { return h_; }
  // The block that runs next in the same region: its q/k/v permutation is prefetched during this one.
  void set_next(const DecodeBlock* next) { next_ = next; }

  void run() {
    g_o->prefetch_perm();   // act-order: ~1% of a token at batch 1 (SmolLM2, Zen 4); down has none left
    g_gu->prefetch_perm();  // (compressor.nn.prepare.fold_act_order_), q/k/v's came with the block before
    rows(0, [&](int64_t m) {
      rms_norm_into(xp + m * H, ln1p, h1p + m * H, 1, H, eps);
      g_qkv->prepare_rows(h1p, m, m + 1);
    });
    project(*g_qkv);
    rows(1, [&](int64_t b) {
      float* row = qkvp + b * n_qkv;
      add_bias(row, b_qkv, n_qkv);
      rope(row, nh + nkv, hd, cosp, sinp);
      for (int64_t g = 0; g < nkv; ++g) {
        kc.put((b * nkv + g) * S + pos, row + nq + g * hd, hd);
        vc.put((b * nkv + g) * S + pos, row + nq + nk + g * hd, hd);
      }
    });
    {
      std::vector<float> p(per * L);
      for (int64_t i; (i = attn_next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        attend_item(ks, qkvp, n_qkv, kc, vc, i, per, nh, nkv, S, hd, L, scale, attnp, p.data());
        attn_done.fetch_add(1, std::memory_order_acq_rel);
      }
      while (attn_done.load(std::memory_order_acquire) < items) spin();
    }
    rows(2, [&](int64_t m) { g_o->prepare_rows(attnp, m, m + 1); });
    project(*g_o);
    rows(3, [&](int64_t m) {
      add_bias(op + m * H, b_o, H);
      for (int64_t i = m * H; i < (m + 1) * H; ++i) hp[i] = xp[i] + op[i];
      rms_norm_into(hp + m * H, ln2p, h2p + m * H, 1, H, eps);
      g_gu->prepare_rows(h2p, m, m + 1);
    });
    project(*g_gu);
    rows(4, [&](int64_t m) {
      add_bias(gup + m * 2 * I, b_gu, 2 * I);
      ks->silu_mul(gup + m * 2 * I, gup + m * 2 * I + I, actp + m * I, I);  // at::silu_out + mul_: ~12 us of setup
      g_dn->prepare_rows(actp, m, m + 1);
    });
    if (next_) next_->g_qkv->prefetch_perm();  // needed as soon as the next block starts
    project(*g_dn);
    rows(5, [&](int64_t m) {
      add_bias(dnp + m * H, b_dn, H);
      for (int64_t i = m * H; i < (m + 1) * H; ++i) hp[i] += dnp[i];
    });
  }

 private:
  // fn(m) for every row m < M, rows claimed one at a time by whichever thread comes; returns when all are done.
  template <typename Fn>
  void rows(int i, const Fn& fn) {
    for (int64_t m; (m = row_next[i].fetch_add(1, std::memory_order_relaxed)) < M;) {
      fn(m);
      row_done[i].fetch_add(1, std::memory_order_acq_rel);
    }
    while (row_done[i].load(std::memory_order_acquire) < M) spin();
  }
  static void project(DecodeGemv& g) {
    g.run();
    while (!g.finished()) spin();
  }
  static void add_bias(float* y, const at::Tensor& b, int64_t n) {
    if (!b.defined()) return;
    const float* bp = b.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) y[i] += bp[i];
  }

  const int64_t M, H, S, L, pos, nh, nkv, hd, nq, nk, n_qkv, I;
  const double eps;
  const float scale;
  const float* xp;
  at::Tensor h_;
  const Cache kc, vc;
  const KernelSet* ks;
  const int64_t per, items;
  float *hp, *h1p, *qkvp, *attnp, *op, *h2p, *gup, *actp, *dnp;
  const float *ln1p, *ln2p, *cosp, *sinp;
  std::unique_ptr<DecodeGemv> g_qkv, g_o, g_gu, g_dn;
  const DecodeBlock* next_ = nullptr;
  at::Tensor b_qkv, b_o, b_gu, b_dn;
  std::atomic<int64_t> row_next[6] = {}, row_done[6] = {}, attn_next{0}, attn_done{0};
};

// Run `blocks` one after the other in one parallel region.
void run_blocks(const std::vector<std::unique_ptr<DecodeBlock>>& blocks) {
  const at::ThreadLocalState tls;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(tls);
    for (const auto& b : blocks) b->run();
  });
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

// A single-token step's DecodeBlock: rows x (M, H) in, its output written into h (M, H), on `scratch`.
std::unique_ptr<DecodeBlock> decode_block(const float* x, at::Tensor h, float* scratch,
                                          const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                                          const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1,
                                          const at::Tensor& ln2, const Block& b, double eps, double scale) {
  return std::make_unique<DecodeBlock>(x, std::move(h), scratch, k_cache, v_cache, pos, cos, sin,
                                       ln1, ln2, b.qkv, b.o, b.gu, b.down, b.nh, b.nkv, b.hd, eps, scale);
}

int64_t scratch_floats(const at::Tensor& x, const Block& b) {
  return DecodeBlock::scratch_floats(x.size(0), x.size(2), b.qkv.out, b.nh * b.hd, b.gu.out / 2);
}

// Decode (one token per row, fewer than 32 rows) runs as DecodeBlocks in one parallel region.
bool is_decode(const at::Tensor& x) { return x.size(1) == 1 && x.size(0) < 32; }

at::Tensor block_forward(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& ln1, const at::Tensor& ln2,
                         const Block& blk, double eps, double scale) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), M = B * T, S = k_cache.size(2), L = pos + T;
  const int64_t nh = blk.nh, nkv = blk.nkv, hd = blk.hd, nq = nh * hd, nk = nkv * hd, n_qkv = blk.qkv.out;
  const int64_t I = blk.gu.out / 2;
  const Linear &qkv_p = blk.qkv, &o_p = blk.o, &gu_p = blk.gu, &down_p = blk.down;
  if (is_decode(x)) {
    at::Tensor scratch = at::empty({scratch_floats(x, blk)}, x.options());
    std::vector<std::unique_ptr<DecodeBlock>> one;
    one.push_back(decode_block(x.data_ptr<float>(), at::empty({M, H}, x.options()), scratch.data_ptr<float>(),
                               k_cache, v_cache, pos, cos, sin, ln1, ln2, blk, eps, scale));
    run_blocks(one);
    return one[0]->out().view({M, 1, H});
  }

  // attention
  const at::Tensor x2 = x.view({M, H});
  at::Tensor qkv = qkv_p(rms_norm(x2, ln1, eps));                   // (M, nq + 2 nk)
  float* qp = qkv.data_ptr<float>();
  const Cache kc(k_cache), vc(v_cache);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      float* row = qp + (b * T + t) * n_qkv;
      const int64_t p = pos + t;
      rope(row, nh + nkv, hd, cp + p * hd, sp + p * hd);               // q and k heads are adjacent
      for (int64_t g = 0; g < nkv; ++g) {
        kc.put((b * nkv + g) * S + p, row + nq + g * hd, hd);
        vc.put((b * nkv + g) * S + p, row + nq + nk + g * hd, hd);
      }
    }
  at::Tensor attn;
  if (T == 1) {
    attn = at::empty({M, nq}, x.options());
    attend_decode(qp, n_qkv, kc, vc, B, nh, nkv, S, hd, L, float(scale), attn.data_ptr<float>());
  } else {
    const at::Tensor q = qkv.view({B, T, nh + 2 * nkv, hd}).narrow(2, 0, nh).transpose(1, 2);
    at::Tensor k = k_cache.narrow(2, 0, L), v = v_cache.narrow(2, 0, L);
    if (kc.half) {  // a prompt attends to its own keys at full precision; later chunks widen the cached ones
      const at::Tensor fresh = qkv.view({B, T, nh + 2 * nkv, hd});
      k = pos == 0 ? fresh.narrow(2, nh, nkv).transpose(1, 2) : k.to(at::kFloat);
      v = pos == 0 ? fresh.narrow(2, nh + nkv, nkv).transpose(1, 2) : v.to(at::kFloat);
    }
    if (nkv < nh) {
      k = k.repeat_interleave(nh / nkv, 1);
      v = v.repeat_interleave(nh / nkv, 1);
    }
    std::optional<at::Tensor> mask;
    if (pos > 0)   // a later chunk: row t sees positions <= pos + t
      mask = at::arange(L, x.options().dtype(at::kLong)).unsqueeze(0) <=
             at::arange(pos, L, x.options().dtype(at::kLong)).unsqueeze(1);
    attn = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/pos == 0, scale)
               .transpose(1, 2).reshape({M, nq});
  }
  at::Tensor h = x2 + o_p(attn);

  // MLP
  at::Tensor gu = gu_p(rms_norm(h, ln2, eps));                       // (M, 2 I): gate, then up
  at::Tensor act = at::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));
  h.add_(down_p(act));
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
  const int64_t M = x.size(0), H = x.size(2);
  int64_t floats = 0;
  for (const Block& b : blocks) floats = std::max(floats, scratch_floats(x, b));
  at::Tensor scratch = at::empty({floats}, x.options());
  at::Tensor hs[2] = {at::empty({M, H}, x.options()), at::empty({M, H}, x.options())};  // block l writes hs[l % 2]
  std::vector<std::unique_ptr<DecodeBlock>> run;
  const float* in = x.data_ptr<float>();
  for (int64_t l = 0; l < n; ++l) {
    run.push_back(decode_block(in, hs[l % 2], scratch.data_ptr<float>(), k_caches[l], v_caches[l], pos, cos, sin,
                               norms[2 * l], norms[2 * l + 1], blocks[l], eps, scales[l]));
    in = hs[l % 2].data_ptr<float>();
    if (l > 0) run[l - 1]->set_next(run[l].get());
  }
  run_blocks(run);
  return hs[(n - 1) % 2].view({M, 1, H});
}

}  // namespace
}  // namespace compressor

TORCH_LIBRARY_IMPL(compressor, CPU, m) {
  m.impl("llama_layer", &compressor::llama_layer);
  m.impl("llama_stack", &compressor::llama_stack);
}
