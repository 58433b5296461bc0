// Argument checks of merge_states shared by its CPU and CUDA launchers (device checks stay with each launcher).
#pragma once

#include <torch/extension.h>

namespace pskernels {

inline void check_merge_states_args(const at::Tensor& outs, const at::Tensor& lses) {
  TORCH_CHECK(outs.dim() == 5, "outs: expected [N, B, H, L, Dv], got ", outs.sizes());
  TORCH_CHECK(lses.dim() == 4 && lses.sizes() == outs.sizes().slice(0, 4), "lses: expected ",
              outs.sizes().slice(0, 4), ", got ", lses.sizes());
  TORCH_CHECK(lses.scalar_type() == at::kFloat, "lses: expected float32, got ", lses.scalar_type());
}

}  // namespace pskernels
