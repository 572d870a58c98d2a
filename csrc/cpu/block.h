// One decoder block of a llama-architecture model on raw pointers: the torch-free core that layer.cpp (the
// compressor::llama_layer / llama_stack ops) and csrc/engine/engine.cpp (compressor.runtime's engine) share.
// compressor/kernels/layer.py documents the arithmetic (its `reference` is the oracle). Plain C++: no ATen.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <unistd.h>

#include "decode.h"
#include "kernels.h"

namespace compressor {

// A block's weights: the four packed projections (q/k/v fused, o, gate/up fused, down), fp32 biases or
// null, the two norms' fp32 weights, the attention shape and its softmax scale.
struct BlockRef {
  PackedRef qkv, o, gu, down;
  const float *b_qkv = nullptr, *b_o = nullptr, *b_gu = nullptr, *b_dn = nullptr;
  const float *ln1 = nullptr, *ln2 = nullptr;
  int64_t nh = 0, nkv = 0, hd = 0;
  float scale = 1.0f;
};

// yp = x * rsqrt(mean(x^2) + eps) * w over each of M rows of H (HF's LlamaRMSNorm, in fp32).
inline void rms_norm_into(const float* xp, const float* wp, float* yp, int64_t M, int64_t H, double eps) {
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
inline int64_t heads_per_item(int64_t M, int64_t nh, int64_t nkv, int threads) {
  return M * nkv >= 4 * threads ? nh / nkv : 1;
}

// A K or V cache (B, nkv, S, hd), float32 or fp16 (batched generation: half the bytes attention reads):
// rows are written from fp32 and widened back exactly by the kernel set's attention.
struct Cache {
  void* data;
  bool half;
  // row: (b * nkv + g) * S + position
  void put(const KernelSet* ks, int64_t row, const float* src, int64_t hd) const {
    if (half) {
      ks->to_half(src, hd, static_cast<uint16_t*>(data) + row * hd);
    } else {
      std::memcpy(static_cast<float*>(data) + row * hd, src, hd * sizeof(float));
    }
  }
  template <typename T>
  const T* at_row(int64_t row, int64_t hd) const { return static_cast<const T*>(data) + row * hd; }
  // The cache of batch rows b, b + 1, ... only (of nkv heads, S positions, hd each).
  Cache from_row(int64_t b, int64_t nkv, int64_t S, int64_t hd) const {
    return {static_cast<char*>(data) + b * nkv * S * hd * (half ? 2 : 4), half};
  }
};

inline void attend_item(const KernelSet* ks, const float* qkv, int64_t ld_qkv, const Cache& kc, const Cache& vc, int64_t i,
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
// Everything is set up in the constructor, on the calling thread (allocations do not belong in the region):
// the DecodeGemvs; `int8` as DecodeGemv's. The output goes to h (M, H). `scratch` (scratch_floats) holds the
// intermediate rows and the DecodeGemvs' buffers; blocks that run one after the other in a region may share it
// (the last phase to read it ends before the next block starts).
class DecodeBlock {
 public:
  // The intermediate rows, then the four DecodeGemvs' buffers (64-byte aligned).
  static int64_t scratch_floats(int64_t M, int64_t H, const BlockRef& b, bool int8) {
    int64_t bytes = 64;
    for (const PackedRef* w : {&b.qkv, &b.o, &b.gu, &b.down}) bytes += DecodeGemv::scratch_bytes(*w, M, int8);
    return M * (4 * H + b.qkv.N + b.nh * b.hd + 3 * (b.gu.N / 2)) + bytes / 4;
  }

  // Rows x (M, H) in, at position pos of caches kc, vc (B = M rows, S positions); output into h (M, H).
  DecodeBlock(const float* x, float* h, int64_t M, int64_t H, float* scratch, Cache kc, Cache vc, int64_t S,
              int64_t pos, const float* cos, const float* sin, const BlockRef& b, double eps, int threads, bool int8)
      : M(M), H(H), S(S), L(pos + 1), pos(pos), nh(b.nh), nkv(b.nkv), hd(b.hd), nq(nh * hd), nk(nkv * hd),
        n_qkv(b.qkv.N), I(b.gu.N / 2), eps(eps), scale(b.scale), xp(x), hp(h), kc(kc), vc(vc), ks(kernel_set()),
        per(heads_per_item(M, nh, nkv, threads)), items(M * nh / per), b_qkv(b.b_qkv), b_o(b.b_o), b_gu(b.b_gu),
        b_dn(b.b_dn) {
    h1p = scratch;
    qkvp = h1p + M * H;
    attnp = qkvp + M * n_qkv;
    op = attnp + M * nq;
    h2p = op + M * H;
    gup = h2p + M * H;
    actp = gup + M * 2 * I;
    dnp = actp + M * I;
    ln1p = b.ln1;
    ln2p = b.ln2;
    cosp = cos + pos * hd;
    sinp = sin + pos * hd;
    char* mem = reinterpret_cast<char*>(dnp + M * H);
    mem += -reinterpret_cast<intptr_t>(mem) & 63;
    const auto gemv = [&](const PackedRef& w, float* y) {
      auto g = std::make_unique<DecodeGemv>(w, M, y, threads, int8, mem);
      mem += DecodeGemv::scratch_bytes(w, M, int8);
      return g;
    };
    g_qkv = gemv(b.qkv, qkvp);
    g_o = gemv(b.o, op);
    g_gu = gemv(b.gu, gup);
    g_dn = gemv(b.down, dnp);
  }

  // The block that runs next in the same region: its q/k/v permutation is prefetched during this one.
  void set_next(const DecodeBlock* next) { next_ = next; }

  void run() {
    g_o->prefetch_perm();   // act-order: ~1% of a token at batch 1 (SmolLM2, Zen 4); down has none left
    g_gu->prefetch_perm();  // (compressor.nn.prepare.fold_act_order_), q/k/v's came with the block before
    rows(0, [&](int64_t m) {
      rms_norm_into(xp + m * H, ln1p, h1p + m * H, 1, H, eps);
      if (!g_qkv->parts()) g_qkv->prepare_rows(h1p, m, m + 1);
    });
    prepare_parts(6, *g_qkv, h1p);
    project(*g_qkv);
    rows(1, [&](int64_t b) {
      float* row = qkvp + b * n_qkv;
      add_bias(row, b_qkv, n_qkv);
      rope(row, nh + nkv, hd, cosp, sinp);
      for (int64_t g = 0; g < nkv; ++g) {
        kc.put(ks, (b * nkv + g) * S + pos, row + nq + g * hd, hd);
        vc.put(ks, (b * nkv + g) * S + pos, row + nq + nk + g * hd, hd);
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
    if (g_o->parts())
      prepare_parts(7, *g_o, attnp);
    else
      rows(2, [&](int64_t m) { g_o->prepare_rows(attnp, m, m + 1); });
    project(*g_o);
    rows(3, [&](int64_t m) {
      add_bias(op + m * H, b_o, H);
      for (int64_t i = m * H; i < (m + 1) * H; ++i) hp[i] = xp[i] + op[i];
      rms_norm_into(hp + m * H, ln2p, h2p + m * H, 1, H, eps);
      if (!g_gu->parts()) g_gu->prepare_rows(h2p, m, m + 1);
    });
    prepare_parts(8, *g_gu, h2p);
    project(*g_gu);
    rows(4, [&](int64_t m) {
      add_bias(gup + m * 2 * I, b_gu, 2 * I);
      ks->silu_mul(gup + m * 2 * I, gup + m * 2 * I + I, actp + m * I, I);  // at::silu_out + mul_: ~12 us of setup
      if (!g_dn->parts()) g_dn->prepare_rows(actp, m, m + 1);
    });
    prepare_parts(9, *g_dn, actp);
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
  // The batch path's preparation of g's input x, by parts of its channels for all rows (DecodeGemv::parts): the
  // rows of one word share a cache line of its int8 activations, so threads that prepared rows each passed
  // every line to the other.
  void prepare_parts(int i, DecodeGemv& g, const float* x) {
    const int64_t n = g.parts();
    if (!n) return;
    for (int64_t j; (j = row_next[i].fetch_add(1, std::memory_order_relaxed)) < n;) {
      g.prepare_part(x, j);
      row_done[i].fetch_add(1, std::memory_order_acq_rel);
    }
    while (row_done[i].load(std::memory_order_acquire) < n) spin();
  }
  static void project(DecodeGemv& g) {
    g.run();
    while (!g.finished()) spin();
  }
  static void add_bias(float* y, const float* b, int64_t n) {
    if (b)
      for (int64_t i = 0; i < n; ++i) y[i] += b[i];
  }

  const int64_t M, H, S, L, pos, nh, nkv, hd, nq, nk, n_qkv, I;
  const double eps;
  const float scale;
  const float* xp;
  float* hp;
  const Cache kc, vc;
  const KernelSet* ks;
  const int64_t per, items;
  float *h1p, *qkvp, *attnp, *op, *h2p, *gup, *actp, *dnp;
  const float *ln1p, *ln2p, *cosp, *sinp;
  std::unique_ptr<DecodeGemv> g_qkv, g_o, g_gu, g_dn;
  const DecodeBlock* next_ = nullptr;
  const float *b_qkv, *b_o, *b_gu, *b_dn;
  std::atomic<int64_t> row_next[10] = {}, row_done[10] = {}, attn_next{0}, attn_done{0};
};

// One block of a DecodeStack: its weights and its K and V caches (B = the step's rows).
struct StackLayer {
  BlockRef block;
  Cache k, v;
  int64_t S;  // positions per cache row
};

// A decode step (one token per row, M < kGemmMinRows rows) through every block, in one parallel region
// (`run` on each of its threads): no return to the caller and no fork/join between blocks.
//
// Rows are split into one group per thread, each with blocks of its own, when each group has >= kMinGroupRows
// rows and every block's packed weights together fit in half the L3 cache. Then no row's data passes between cores:
// in one shared set of blocks each projection's output, half written by each core, is read whole by the row
// phases after it, and each int8 activation line holds all rows. The price is that each group reads every
// weight, which the L3 serves when it holds them all (a 300 MiB Xeon: SmolLM2's 60 MB of blocks; not a 32 MiB
// Zen 4, whose DRAM would serve each weight twice). On that Xeon, SmolLM2 gptq-w4g64, 2 threads, the engine
// paired in one process against the shared blocks: batch 8 1.28x, batch 6 1.23x, batch 1 (one group) 0.99x.
// Batch 4 stays shared (kMinGroupRows): two one-thread processes of 2 rows each made 1255 tok/s, the
// shared step 1420.
// A thread that finishes its group walks the others and helps with whatever is left (DecodeBlock runs
// on any number of threads), so a region with fewer threads than asked still completes.
class DecodeStack {
 public:
  static constexpr int64_t kMinGroupRows = 3;

  DecodeStack(const float* x, int64_t M, int64_t H, const std::vector<StackLayer>& layers, int64_t pos,
              const float* cos, const float* sin, double eps, int threads, bool int8)
      : M_(M), H_(H), n_(int64_t(layers.size())) {
    const int64_t groups = groups_for(M, threads, layers);
    // the groups' scratch, then the two (M, H) buffers the blocks write in turn: one piece of the calling thread's
    // buffer, kept from step to step (fresh buffers of this size came zeroed from new pages every step: +6% at
    // batch 8 without them, paired)
    std::vector<int64_t> at(groups + 1, 0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t rows = M * (g + 1) / groups - M * g / groups;
      int64_t floats = 0;
      for (const StackLayer& l : layers) floats = std::max(floats, DecodeBlock::scratch_floats(rows, H, l.block, int8));
      at[g + 1] = at[g] + floats + 16;  // a cache line apart: each group's scratch is its thread's alone
    }
    float* mem = buffer(at[groups] + 2 * M * H);
    hs_ = mem + at[groups];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = M * g / groups, rows = M * (g + 1) / groups - r0;
      Group& grp = groups_.emplace_back();
      const float* in = x + r0 * H;
      for (int64_t i = 0; i < n_; ++i) {
        const StackLayer& l = layers[i];
        float* h = hs_ + (i % 2) * M * H + r0 * H;  // block i writes hs_[i % 2]
        grp.blocks.push_back(std::make_unique<DecodeBlock>(
            in, h, rows, H, mem + at[g], l.k.from_row(r0, l.block.nkv, l.S, l.block.hd),
            l.v.from_row(r0, l.block.nkv, l.S, l.block.hd), l.S, pos, cos, sin, l.block, eps,
            groups > 1 ? 1 : threads, int8));
        in = h;
        if (i > 0) grp.blocks[i - 1]->set_next(grp.blocks[i].get());
      }
    }
  }

  // The row groups of M rows at `threads` threads (the policy above).
  static int64_t groups_for(int64_t M, int threads, const std::vector<StackLayer>& layers) {
    int64_t bytes = 0;
    for (const StackLayer& l : layers)
      for (const PackedRef* w : {&l.block.qkv, &l.block.o, &l.block.gu, &l.block.down}) bytes += packed_bytes(*w);
    // half the L3: the caches, the activations and other processes want the rest
    return threads > 1 && M >= kMinGroupRows * threads && 2 * bytes <= l3_bytes() ? threads : 1;
  }

  void run() {
    const int64_t G = int64_t(groups_.size()), first = next_.fetch_add(1, std::memory_order_relaxed);
    for (int64_t j = 0; j < G; ++j)
      for (const auto& b : groups_[(first + j) % G].blocks) b->run();
  }

  // (M, H), valid until the next DecodeStack of this thread
  const float* out() const { return hs_ + ((n_ - 1) % 2) * M_ * H_; }

 private:
  struct Group {
    std::vector<std::unique_ptr<DecodeBlock>> blocks;
  };
  static float* buffer(int64_t floats) {  // the calling thread's, grown as needed, never shrunk
    static thread_local std::unique_ptr<float[]> mem;
    static thread_local int64_t size = 0;
    if (size < floats) mem.reset(new float[size = floats]);
    return mem.get();
  }
  static int64_t packed_bytes(const PackedRef& w) {
    const int64_t G = w.K / w.group;
    return w.Nt * kTileN * (w.K / (32 / w.bits) * 4 + G * 2 * (w.zp ? 2 : 1));
  }
  static int64_t l3_bytes() {  // 0 where the C library does not know it: no split
    static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
    return bytes;
  }

  int64_t M_, H_, n_;
  float* hs_;
  std::vector<Group> groups_;
  std::atomic<int64_t> next_{0};
};

// Runs fn on every thread of one parallel region; fn takes its work from shared counters. The caller's threads:
// ATen's in the torch ops (layer.cpp), OpenMP's in the engine (csrc/engine/engine.cpp).
using Region = std::function<void(const std::function<void()>&)>;

// y (M, w.N) = x (M, w.K) W: the kernel set's GEMM at >= kGemmMinRows rows where it has one (x gathered by the
// act-order permutation into `xp` (M, K) first), else DecodeGemv over chunks of fewer rows (`int8` as its).
inline void project_rows(const PackedRef& w, const float* x, int64_t M, float* y, float* xp, int threads, bool int8,
                         const Region& region) {
  const KernelSet* ks = kernel_set();
  if (M >= kGemmMinRows && ks->gemm) {
    if (w.perm) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < w.K; ++k) xp[m * w.K + k] = x[m * w.K + w.perm[k]];
      x = xp;
    }
    std::atomic<int64_t> next{0};
    region([&] {
      std::vector<float> scratch;
      gemm_tiles(ks, w, x, M, y, next, scratch);
    });
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kGemmMinRows - 1) {
    const int64_t rows = std::min<int64_t>(kGemmMinRows - 1, M - m0);
    DecodeGemv g(w, rows, y + m0 * w.N, threads, int8);
    g.prepare(x + m0 * w.K);
    region([&] { g.run(); });
  }
}

// block_rows's intermediate rows for B rows of T tokens (M = B T), carved out of one buffer of `floats` floats:
// h1 (M, H) the normed input, qkv, attn (M, nq), o (M, H) the o and down outputs, gu (M, 2 I), act (M, I), xp
// (M, max(H, nq, I)) the act-order gather of `project`, fresh (B, 2, nkv, T, hd) a prompt's own keys and values.
struct RowsBuffer {
  float *h1, *qkv, *attn, *o, *gu, *act, *xp, *fresh;

  static int64_t floats(const BlockRef& b, int64_t B, int64_t T, int64_t H) { return RowsBuffer(b, B, T, H, nullptr).end; }
  RowsBuffer(const BlockRef& b, int64_t B, int64_t T, int64_t H, float* base) {
    const int64_t M = B * T, nq = b.nh * b.hd, I = b.gu.N / 2;
    int64_t at = 0;
    const auto take = [&](int64_t n) { float* p = base ? base + at : nullptr; at += n; return p; };
    h1 = take(M * H), qkv = take(M * b.qkv.N), attn = take(M * nq), o = take(M * H), gu = take(M * 2 * I);
    act = take(M * I), xp = take(M * std::max<int64_t>({H, nq, I})), fresh = take(B * 2 * b.nkv * T * b.hd);
    end = at;
  }

 private:
  int64_t end = 0;
};

// One block over B rows of T tokens at positions pos .. pos + T - 1 (a prompt, a later chunk of one, or a step
// of too many rows for DecodeBlock), x (B * T, H) updated in place, K and V written into the caches (S
// positions each), on `buf`. `project(i, in, M, out)` computes projection i (0 qkv, 1 o, 2 gate/up, 3 down) without its
// bias: the engine's is project_rows; the torch op's takes ATen's GEMM where the kernel set has none.
// Attention: each (row, KV head) over the positions up to its own, with the kernel set's AttendFn, from the
// caches; a prompt (pos 0) with fp16 caches attends to its own keys and values before they are rounded.
template <typename Project>
void block_rows(const BlockRef& b, float* x, int64_t B, int64_t T, int64_t H, int64_t pos, const Cache& kc,
                const Cache& vc, int64_t S, const float* cos, const float* sin, double eps, const RowsBuffer& buf,
                const Region& region, Project&& project) {
  const int64_t M = B * T, nh = b.nh, nkv = b.nkv, hd = b.hd, nq = nh * hd, nk = nkv * hd, n_qkv = b.qkv.N;
  const int64_t I = b.gu.N / 2, per = nh / nkv;
  float *h1 = buf.h1, *qkv = buf.qkv, *attn = buf.attn, *o = buf.o, *gu = buf.gu, *act = buf.act, *fresh = buf.fresh;
  const bool use_fresh = T > 1 && pos == 0 && kc.half;
  const KernelSet* ks = kernel_set();
  const auto add_bias = [M](float* y, const float* bias, int64_t N) {
    if (bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
  };

  rms_norm_into(x, b.ln1, h1, M, H, eps);
  project(0, h1, M, qkv);
  add_bias(qkv, b.b_qkv, n_qkv);
  for (int64_t bt = 0; bt < M; ++bt) {  // rotary (q and k heads are adjacent), the caches
    const int64_t bi = bt / T, t = bt % T, p = pos + t;
    float* row = qkv + bt * n_qkv;
    rope(row, nh + nkv, hd, cos + p * hd, sin + p * hd);
    for (int64_t g = 0; g < nkv; ++g) {
      kc.put(ks, (bi * nkv + g) * S + p, row + nq + g * hd, hd);
      vc.put(ks, (bi * nkv + g) * S + p, row + nq + nk + g * hd, hd);
      if (use_fresh) {  // (B, 2, nkv, T, hd)
        std::memcpy(fresh + (((bi * 2 + 0) * nkv + g) * T + t) * hd, row + nq + g * hd, hd * sizeof(float));
        std::memcpy(fresh + (((bi * 2 + 1) * nkv + g) * T + t) * hd, row + nq + nk + g * hd, hd * sizeof(float));
      }
    }
  }
  // item (row, KV head), later rows first: the longest go out while the others balance the threads
  const int64_t items = M * nkv;
  std::atomic<int64_t> next{0};
  region([&] {
    std::vector<float> p(per * (pos + T));
    for (int64_t j; (j = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t i = items - 1 - j, bt = i / nkv, g = i % nkv, bi = bt / T, t = bt % T, L = pos + t + 1;
      const float* q = qkv + bt * n_qkv + g * per * hd;
      float* out = attn + bt * nq + g * per * hd;
      const int64_t row = (bi * nkv + g) * S;
      if (use_fresh)
        ks->attend(q, fresh + ((bi * 2 + 0) * nkv + g) * T * hd, fresh + ((bi * 2 + 1) * nkv + g) * T * hd, per, L,
                   hd, b.scale, out, p.data());
      else if (kc.half)
        ks->attend_f16(q, kc.at_row<uint16_t>(row, hd), vc.at_row<uint16_t>(row, hd), per, L, hd, b.scale, out,
                       p.data());
      else
        ks->attend(q, kc.at_row<float>(row, hd), vc.at_row<float>(row, hd), per, L, hd, b.scale, out, p.data());
    }
  });
  project(1, attn, M, o);
  add_bias(o, b.b_o, H);
  for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
  rms_norm_into(x, b.ln2, h1, M, H, eps);
  project(2, h1, M, gu);
  add_bias(gu, b.b_gu, 2 * I);
  for (int64_t m = 0; m < M; ++m) ks->silu_mul(gu + m * 2 * I, gu + m * 2 * I + I, act + m * I, I);
  project(3, act, M, o);
  add_bias(o, b.b_dn, H);
  for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
}

}  // namespace compressor
