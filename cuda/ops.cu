// CUDA implementations of `compressor::int4_linear` and `int8_linear` (schemas, fake kernels and the
// pure-PyTorch reference: compressor/kernels/ops.py). Same arguments, same tile layout as on CPU; x is
// float16 or bfloat16 on a CUDA device. Built by setup.py as `compressor._C_cuda` when torch has CUDA and
// nvcc is found; importing it registers these for the CUDA dispatch key.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "dq_gemm.cuh"

namespace compressor {
namespace {

// The split-K tile counters of a device: zeroed once, and every launch leaves them zero (cuda/dq_gemm.cuh).
// Grown when a larger grid needs more; launches that share them must be ordered (one stream).
at::Tensor locks_for(const at::Device& device, int64_t n) {
  static std::mutex mu;
  static std::vector<at::Tensor> per_device(256);
  const std::lock_guard<std::mutex> hold(mu);
  at::Tensor& t = per_device.at(device.index());
  if (!t.defined() || t.numel() < n)
    t = at::zeros({std::max<int64_t>(n, 4096)}, at::TensorOptions().device(device).dtype(at::kInt));
  return t;
}

at::Tensor dq_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                          const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features, int bits) {
  const int64_t per = 32 / bits;
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, "x must be a CUDA tensor with at least one dimension");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "the CUDA kernels take float16 or bfloat16 x, got ", x.scalar_type());
  const int64_t K = x.size(-1), N = out_features, Nt = (N + 31) / 32;
  const int64_t group = group_size == -1 ? K : group_size;
  TORCH_CHECK(K % 8 == 0 && group > 0 && K % group == 0 && group % per == 0, "K=", K, " and group_size=", group_size,
              ": K must be a multiple of 8 and of the group, and the group of ", per);
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 3 && qweight.size(0) == Nt &&
                  qweight.size(1) * per == K && qweight.size(2) == 32,
              "qweight must be int32 (", Nt, ", ", K / per, ", 32) on x's device, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t G = K / group;
  auto check_qparam = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kHalf && t.dim() == 3 && t.size(0) == Nt && t.size(1) == G &&
                    t.size(2) == 32,
                name, " must be float16 (", Nt, ", ", G, ", 32) on x's device, got ", t.scalar_type(), " ", t.sizes());
  };
  check_qparam(scales, "scales");
  if (zeros) check_qparam(*zeros, "zeros");
  if (perm)
    TORCH_CHECK(perm->is_cuda() && perm->scalar_type() == at::kLong && perm->numel() == K, "perm must be int64 (", K,
                ",) on x's device");
  if (bias) TORCH_CHECK(bias->is_cuda() && bias->numel() == N, "bias must be (", N, ",) on x's device");

  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.reshape(out_shape);
  TORCH_CHECK(M * std::max(K, N) < (int64_t(1) << 31), "M * max(K, N) must stay below 2^31");

  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const Plan plan = make_plan(int(M), int(K), int(N), sms);
  const at::Tensor partials =
      plan.splits > 1 ? at::empty({plan.splits, M, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  const at::Tensor locks = plan.splits > 1 ? locks_for(x.device(), int64_t(plan.grid_x) * plan.grid_y) : at::Tensor();
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous();
  const at::Tensor z = zeros ? zeros->contiguous() : at::Tensor();
  const at::Tensor p = perm ? perm->contiguous() : at::Tensor();
  const at::Tensor b = bias ? bias->to(x.scalar_type()).contiguous() : at::Tensor();

  DqArgs a;
  a.x = x2.data_ptr();
  a.perm = p.defined() ? p.data_ptr<int64_t>() : nullptr;
  a.qweight = q.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const __half*>(s.data_ptr<at::Half>());
  a.zeros = z.defined() ? reinterpret_cast<const __half*>(z.data_ptr<at::Half>()) : nullptr;
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  a.locks = locks.defined() ? locks.data_ptr<int>() : nullptr;
  a.M = int(M), a.K = int(K), a.N = int(N), a.group = int(group), a.bits = bits;
  a.bf16 = x.scalar_type() == at::kBFloat16;
  const cudaError_t err = launch_dq_gemm(a, plan, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dq_gemm launch failed: ", cudaGetErrorString(err));
  return y.reshape(out_shape);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features) {
  return dq_linear_cuda(x, qweight, scales, zeros, perm, bias, group_size, out_features, 4);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features) {
  return dq_linear_cuda(x, qweight, scales, zeros, perm, bias, group_size, out_features, 8);
}

}  // namespace
}  // namespace compressor

TORCH_LIBRARY_IMPL(compressor, CUDA, m) {
  m.impl("int4_linear", &compressor::int4_linear);
  m.impl("int8_linear", &compressor::int8_linear);
}

// An importable module with nothing in it: importing it runs the registration above.
#define COMPRESSOR_CAT2(a, b) a##b
#define COMPRESSOR_CAT(a, b) COMPRESSOR_CAT2(a, b)
#define COMPRESSOR_STR2(a) #a
#define COMPRESSOR_STR(a) COMPRESSOR_STR2(a)
PyMODINIT_FUNC COMPRESSOR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, COMPRESSOR_STR(TORCH_EXTENSION_NAME),
                            "compressor CUDA dequant-matmul kernels (compressor::int4_linear / int8_linear for CUDA)",
                            -1, nullptr};
  return PyModule_Create(&def);
}
