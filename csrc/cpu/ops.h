// The CPU ops of ops.cpp as plain C++ functions, for other translation units that chain them
// (layer.cpp) without a trip through the dispatcher. ATen types: not for the ISA-specific files or the
// torch-free core (decode.h and kernels.h, included here, are plain C++).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <optional>
#include <vector>

#include "decode.h"
#include "kernels.h"

namespace compressor {

// compressor::int4_linear / int8_linear (bits 4 or 8), see compressor/kernels/ops.py for the layout.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& perm,
                        const std::optional<at::Tensor>& bias, int64_t group_size, int64_t out_features, int bits);

// A packed weight's tensors (contiguous, the layout of compressor/kernels/ops.py) as decode.h's PackedRef.
PackedRef packed_ref(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                     const std::optional<at::Tensor>& perm, int64_t group_size, int64_t out_features, int bits);

// Whether the calling thread allows int8 activations (compressor.kernels.int8_activations; DecodeGemv's `int8`).
bool int8_rows();

// compressor::f16_linear.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace compressor
