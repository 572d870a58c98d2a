// The CPU ops of ops.cpp as plain C++ functions, for other translation units that chain them
// (layer.cpp) without a trip through the dispatcher. ATen types: not for the ISA-specific files.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace compressor {

// compressor::int4_linear / int8_linear (bits 4 or 8), see compressor/kernels/ops.py for the layout.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                        const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features, int bits);

// compressor::f16_linear.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace compressor
