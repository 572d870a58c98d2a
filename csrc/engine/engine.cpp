// The generation engine of compressor.runtime: a llama-architecture model (llama, mistral, qwen2) whose seven
// projections per block are packed 4/8-bit weights, run from plain arrays with no torch in the process.
// A C API for ctypes (compressor/runtime/engine.py); the weights stay owned by the caller, which must keep
// them alive. The blocks are csrc/cpu/block.h and decode.h, the code compressor::llama_stack runs, so they compute
// what `compressor.load(...).generate`'s compute, bit for bit; the final norm is this file's own loop.
//
//   decode (T == 1, B < 32): every block of a step in one OpenMP parallel region (DecodeStack), as llama_stack;
//   prompts (T > 1), or steps of >= 32 rows: block by block (block_rows, the code of the torch op's prompts),
//   each projection the kernel set's GEMM (>= 32 rows, where it has one) or DecodeGemv.
//
// Every function returns 0 on success and -1 on a bad argument, with the reason in cmp_error().
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/block.h"
#include "../cpu/decode.h"
#include "../cpu/kernels.h"

namespace compressor {
namespace {

thread_local std::string g_error;

struct Bad : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

void check(bool ok, const std::string& what) {
  if (!ok) throw Bad(what);
}

enum HeadKind { kHeadF16 = 0, kHeadPacked = 1 };
enum EmbedKind { kEmbedF16 = 0, kEmbedF32 = 1, kEmbedTied = 2 };

struct Engine {
  int64_t H, nh, nkv, hd, n_layers, vocab;
  double eps;
  int threads;
  std::vector<BlockRef> blocks;
  std::vector<bool> have;
  const float *cos = nullptr, *sin = nullptr;
  int64_t rope_rows = 0;
  int head_kind = -1, embed_kind = -1;
  PackedRef head;
  const uint16_t* head_f16 = nullptr;
  const float* norm = nullptr;
  const void* embed = nullptr;
  // KV caches: (layers, 2, B, nkv, S, hd), float32 or fp16; only the positions written are ever read
  std::unique_ptr<char[]> cache;
  int64_t cache_B = 0, cache_S = 0;
  bool cache_half = false;

  Cache kv(int64_t l, int which) const {
    const int64_t per = cache_B * nkv * cache_S * hd, elem = cache_half ? 2 : 4;
    return {cache.get() + (2 * l + which) * per * elem, cache_half};
  }
};

PackedRef packed(const void* const* p, const int64_t* m) {
  // p: qweight, scales, zeros, perm; m: bits, group, N, K, Nt
  PackedRef w;
  w.qw = static_cast<const int32_t*>(p[0]);
  w.sc = static_cast<const uint16_t*>(p[1]);
  w.zp = static_cast<const uint16_t*>(p[2]);
  w.perm = static_cast<const int64_t*>(p[3]);
  w.bits = int(m[0]);
  w.K = m[3];
  w.group = m[1] == -1 ? w.K : m[1];
  w.N = m[2];
  w.Nt = m[4];
  check(w.bits == 4 || w.bits == 8, "bits must be 4 or 8, got " + std::to_string(w.bits));
  const int P = 32 / w.bits;
  check(w.qw && w.sc, "a packed weight needs qweight and scales");
  check(w.K > 0 && w.K % P == 0 && w.group > 0 && w.K % w.group == 0 && w.group % P == 0,
        "in_features " + std::to_string(w.K) + " and group " + std::to_string(w.group) + " do not fit " +
            std::to_string(w.bits) + "-bit words");
  check(w.N > 0 && w.Nt == (w.N + kTileN - 1) / kTileN, "out_features " + std::to_string(w.N) + " needs " +
                                                              std::to_string((w.N + kTileN - 1) / kTileN) + " tiles");
  return w;
}

// The engine's threads: one OpenMP region of e.threads.
Region omp_region(int threads) {
  return [threads](const std::function<void()>& fn) {
#pragma omp parallel num_threads(threads)
    fn();
  };
}

void embed(const Engine& e, const int64_t* ids, int64_t n, float* x) {
  const int64_t H = e.H;
  for (int64_t i = 0; i < n; ++i)
    check(ids[i] >= 0 && ids[i] < e.vocab,
          "token id " + std::to_string(ids[i]) + " is outside the vocabulary of " + std::to_string(e.vocab));
  for (int64_t i = 0; i < n; ++i) {
    float* row = x + i * H;
    const int64_t id = ids[i];
    if (e.embed_kind == kEmbedF32) {
      std::memcpy(row, static_cast<const float*>(e.embed) + id * H, H * sizeof(float));
    } else if (e.embed_kind == kEmbedF16) {
      const uint16_t* src = static_cast<const uint16_t*>(e.embed) + id * H;
      for (int64_t k = 0; k < H; ++k) row[k] = half_to_float(src[k]);
    } else {  // the quantized head's row: (q - zero) * scale, in the checkpoint's channel order
      const PackedRef& w = e.head;
      const int P = 32 / w.bits, mask = (1 << w.bits) - 1;
      const int64_t t = id / kTileN, c = id % kTileN, G = w.K / w.group;
      const int32_t* qw = w.qw + t * (w.K / P) * kTileN + c;
      for (int64_t k = 0; k < w.K; ++k) {
        const int64_t g = k / w.group, q = (uint32_t(qw[(k / P) * kTileN]) >> (w.bits * (k % P))) & mask;
        const float z = w.zp ? half_to_float(w.zp[(t * G + g) * kTileN + c]) : float(1 << (w.bits - 1));
        const float v = (float(q) - z) * half_to_float(w.sc[(t * G + g) * kTileN + c]);
        row[w.perm ? w.perm[k] : k] = v;
      }
    }
  }
}

// A prompt, or a step of too many rows for the decode region: block_rows (block.h) on each block.
void rows_step(Engine& e, float* x, int64_t B, int64_t T, int64_t pos) {
  int64_t floats = 0;
  for (const BlockRef& b : e.blocks) floats = std::max(floats, RowsBuffer::floats(b, B, T, e.H));
  std::vector<float> mem(floats);
  const Region region = omp_region(e.threads);
  for (int64_t l = 0; l < e.n_layers; ++l) {
    const BlockRef& b = e.blocks[l];
    const PackedRef* w[4] = {&b.qkv, &b.o, &b.gu, &b.down};
    const RowsBuffer buf(b, B, T, e.H, mem.data());
    block_rows(b, x, B, T, e.H, pos, e.kv(l, 0), e.kv(l, 1), e.cache_S, e.cos, e.sin, e.eps, buf, region,
               [&](int i, const float* in, int64_t M, float* out) {
                 project_rows(*w[i], in, M, out, buf.xp, e.threads, false, region);
               });
  }
}

std::vector<StackLayer> stack_layers(const Engine& e) {
  std::vector<StackLayer> layers;
  for (int64_t l = 0; l < e.n_layers; ++l) layers.push_back({e.blocks[l], e.kv(l, 0), e.kv(l, 1), e.cache_S});
  return layers;
}

// One decode step of B < 32 rows: every block in one parallel region (DecodeStack), as compressor::llama_stack.
void decode_step(Engine& e, const float* x, int64_t B, int64_t pos, float* out, bool int8) {
  DecodeStack stack(x, B, e.H, stack_layers(e), pos, e.cos, e.sin, e.eps, e.threads, int8);
#pragma omp parallel num_threads(e.threads)
  stack.run();
  std::memcpy(out, stack.out(), B * e.H * sizeof(float));
}

void head(const Engine& e, const float* x, int64_t B, float* logits, bool int8) {
  if (e.head_kind == kHeadPacked) {
    std::vector<float> xp(e.head.perm ? B * e.head.K : 0);
    project_rows(e.head, x, B, logits, xp.data(), e.threads, int8, omp_region(e.threads));
    return;
  }
  const KernelSet* ks = kernel_set();
  const int64_t K = e.H, N = e.vocab;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (2 * K));
#pragma omp parallel for num_threads(e.threads) schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += grain) {
    const int64_t n1 = std::min(N, n0 + grain);
    for (int64_t m0 = 0; m0 < B; m0 += kF16MaxRows)
      ks->gemv_f16(x + m0 * K, K, int(std::min<int64_t>(kF16MaxRows, B - m0)), e.head_f16 + n0 * K, K, n1 - n0,
                   logits + m0 * N + n0, N);
  }
}

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& ex) {
    g_error = ex.what();
    return -1;
  }
}

}  // namespace
}  // namespace compressor

using compressor::Engine;

extern "C" {

const char* cmp_error() { return compressor::g_error.c_str(); }

const char* cmp_isa() { return compressor::kernel_set()->name; }

// Force a kernel set ("avx512", "avx2", "scalar", "auto"), for tests; -1 if this CPU lacks it.
int cmp_set_isa(const char* name) {
  using namespace compressor;
  return guarded([&] {
    const std::string n(name);
    const KernelSet* best = best_kernel_set();
    const KernelSet* ks = n == "auto" ? best : n == "scalar" ? scalar_kernels()
                          : n == "avx2" ? (best == scalar_kernels() ? nullptr : avx2_kernels())
                          : n == "avx512" ? (best == avx512_kernels() ? best : nullptr) : nullptr;
    check(ks != nullptr, "instruction set '" + n + "' is unknown or not supported by this CPU (best is " +
                             best->name + ")");
    use_kernel_set(ks);
  });
}

Engine* cmp_new(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t layers, int64_t vocab,
                double eps, int threads) {
  using namespace compressor;
  Engine* e = nullptr;
  guarded([&] {
    check(hidden > 0 && heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0 &&
              layers > 0 && vocab > 0 && threads > 0,
          "not a valid model shape (hidden, heads, kv_heads, head_dim, layers, vocab, threads)");
    e = new Engine{hidden, heads, kv_heads, head_dim, layers, vocab, eps, threads};
    e->blocks.resize(layers);
    e->have.assign(layers, false);
  });
  return e;
}

void cmp_free(Engine* e) { delete e; }

// Block `layer`: p = (qweight, scales, zeros, perm, bias) of qkv, o, gate_up, down, then ln1, ln2 (22 pointers;
// zeros, perm, bias may be null); m = (bits, group, out_features, in_features, tiles) of each projection.
int cmp_set_block(Engine* e, int64_t layer, const void* const* p, const int64_t* m, double scale) {
  using namespace compressor;
  return guarded([&] {
    check(layer >= 0 && layer < e->n_layers, "layer " + std::to_string(layer) + " out of range");
    BlockRef b;
    PackedRef* w[4] = {&b.qkv, &b.o, &b.gu, &b.down};
    const float** bias[4] = {&b.b_qkv, &b.b_o, &b.b_gu, &b.b_dn};
    for (int i = 0; i < 4; ++i) {
      *w[i] = packed(p + 5 * i, m + 5 * i);
      *bias[i] = static_cast<const float*>(p[5 * i + 4]);
    }
    b.ln1 = static_cast<const float*>(p[20]);
    b.ln2 = static_cast<const float*>(p[21]);
    b.nh = e->nh, b.nkv = e->nkv, b.hd = e->hd, b.scale = float(scale);
    const int64_t H = e->H;
    check(b.ln1 && b.ln2, "norm weights missing");
    check(b.qkv.K == H && b.qkv.N == (b.nh + 2 * b.nkv) * b.hd && b.o.K == b.nh * b.hd && b.o.N == H &&
              b.gu.K == H && b.gu.N % 2 == 0 && b.down.K == b.gu.N / 2 && b.down.N == H,
          "layer " + std::to_string(layer) + ": projection shapes do not match hidden " + std::to_string(H));
    e->blocks[layer] = b;
    e->have[layer] = true;
  });
}

int cmp_set_rope(Engine* e, const float* cos, const float* sin, int64_t rows) {
  e->cos = cos, e->sin = sin, e->rope_rows = rows;
  return 0;
}

// The final norm and the head: kind 0, p[0] an fp16 (vocab, hidden) weight; kind 1, p = packed weight
// (qweight, scales, zeros, perm) with m = (bits, group, out_features, in_features, tiles).
int cmp_set_head(Engine* e, int kind, const void* const* p, const int64_t* m, const float* norm) {
  using namespace compressor;
  return guarded([&] {
    check(norm != nullptr, "final norm missing");
    if (kind == kHeadF16) {
      check(p[0] != nullptr, "fp16 head weight missing");
      e->head_f16 = static_cast<const uint16_t*>(p[0]);
    } else {
      check(kind == kHeadPacked, "head kind must be 0 (fp16) or 1 (packed)");
      e->head = packed(p, m);
      check(e->head.K == e->H && e->head.N == e->vocab, "head shape does not match hidden and vocab");
    }
    e->head_kind = kind;
    e->norm = norm;
  });
}

// The input embedding: kind 0 an fp16 (vocab, hidden) table, 1 float32, 2 the packed head's rows (tied).
int cmp_set_embedding(Engine* e, int kind, const void* table) {
  using namespace compressor;
  return guarded([&] {
    check(kind == kEmbedF16 || kind == kEmbedF32 || kind == kEmbedTied, "embedding kind must be 0, 1 or 2");
    check(kind == kEmbedTied ? e->head_kind == kHeadPacked : table != nullptr,
          "a tied embedding needs the packed head set first; the others a table");
    e->embed_kind = kind;
    e->embed = table;
  });
}

// KV caches for `batch` rows of up to `length` positions (fp16 when `half`); the old ones are freed.
int cmp_reserve(Engine* e, int64_t batch, int64_t length, int half) {
  using namespace compressor;
  return guarded([&] {
    check(batch > 0 && length > 0, "batch and length must be positive");
    e->cache.reset();
    const int64_t n = e->n_layers * 2 * batch * e->nkv * length * e->hd * (half ? 2 : 4);
    e->cache.reset(new char[n]);  // not zeroed: pages become resident as positions are written
    e->cache_B = batch, e->cache_S = length, e->cache_half = half != 0;
  });
}

// The threads later calls run on (nothing the engine holds depends on it: each call sizes its own work).
int cmp_set_threads(Engine* e, int threads) {
  using namespace compressor;
  return guarded([&] {
    check(threads > 0, "threads must be positive, got " + std::to_string(threads));
    e->threads = threads;
  });
}

// The row groups a decode step of B rows runs in (DecodeStack, block.h), for tests.
int64_t cmp_decode_groups(const Engine* e, int64_t B) {
  return compressor::DecodeStack::groups_for(B, e->threads, compressor::stack_layers(*e));
}

// Logits (B, vocab) after the last of ids (B, T), which sit at positions pos .. pos + T - 1 of the caches.
// `int8`: batched decode steps take int8 activations (compressor.kernels.int8_activations).
int cmp_forward(Engine* e, const int64_t* ids, int64_t B, int64_t T, int64_t pos, int int8, float* logits) {
  using namespace compressor;
  return guarded([&] {
    for (int64_t l = 0; l < e->n_layers; ++l) check(e->have[l], "layer " + std::to_string(l) + " was not set");
    check(e->head_kind >= 0 && e->embed_kind >= 0 && e->cos && e->sin, "head, embedding or rotary tables not set");
    check(B > 0 && T > 0 && B == e->cache_B, "batch " + std::to_string(B) + " does not match the caches' " +
                                                 std::to_string(e->cache_B) + " (cmp_reserve)");
    check(pos >= 0 && pos + T <= e->cache_S && pos + T <= e->rope_rows,
          "positions up to " + std::to_string(pos + T) + " exceed the caches (" + std::to_string(e->cache_S) +
              ") or the rotary tables (" + std::to_string(e->rope_rows) + ")");
    const int64_t H = e->H, M = B * T;
    std::vector<float> x(M * H), last(B * H);
    embed(*e, ids, M, x.data());
    if (T == 1 && B < kGemmMinRows) {
      decode_step(*e, x.data(), B, pos, last.data(), int8 != 0);
    } else {
      rows_step(*e, x.data(), B, T, pos);
      for (int64_t b = 0; b < B; ++b) std::memcpy(last.data() + b * H, x.data() + (b * T + T - 1) * H, H * sizeof(float));
    }
    std::vector<float> normed(B * H);
    rms_norm_into(last.data(), e->norm, normed.data(), B, H, e->eps);
    head(*e, normed.data(), B, logits, int8 != 0 && B > 1);
  });
}

}  // extern "C"
