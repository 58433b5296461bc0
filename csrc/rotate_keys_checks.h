// Argument checks of rotate_keys shared by its CPU and CUDA launchers (device checks stay with each launcher).
#pragma once

#include <torch/extension.h>

namespace pskernels {

inline void check_rotate_keys_args(const at::Tensor& k, const at::Tensor& delta, const at::Tensor& inv_freq) {
  TORCH_CHECK(k.dim() == 4, "k: expected [B, H, L, D], got ", k.sizes());
  TORCH_CHECK(k.size(3) <= 1 || k.stride(3) == 1, "k: expected a contiguous last dimension");
  const int64_t B = k.size(0), L = k.size(2), D = k.size(3);
  TORCH_CHECK(delta.scalar_type() == at::kLong && delta.dim() == 2 && delta.size(0) == B && delta.size(1) == L,
              "delta: expected int64 [B, L] = [", B, ", ", L, "], got ", delta.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && 2 * inv_freq.size(0) <= D,
              "inv_freq: expected float32 [rotary_dim / 2] with rotary_dim <= ", D);
}

}  // namespace pskernels
