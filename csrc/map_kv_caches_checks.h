// Argument checks of map_kv_caches shared by its CPU and CUDA launchers (device checks stay with each launcher).
#pragma once

#include <torch/extension.h>

namespace pskernels {

// Returns N, the branches per layer (keys and values hold num_layers x N tensors each).
inline int64_t check_map_kv_caches_args(at::TensorList keys, at::TensorList values, int64_t num_layers,
                                        const at::Tensor& orig_pos, const at::Tensor& new_pos,
                                        const c10::optional<at::Tensor>& k_down, const c10::optional<at::Tensor>& k_up,
                                        const c10::optional<at::Tensor>& v_down,
                                        const c10::optional<at::Tensor>& v_up) {
  const int64_t total = static_cast<int64_t>(keys.size());
  TORCH_CHECK(num_layers > 0 && total % num_layers == 0 && static_cast<int64_t>(values.size()) == total,
              "keys/values: expected num_layers x N tensors each");
  const int64_t N = total / num_layers;
  TORCH_CHECK(orig_pos.scalar_type() == at::kLong && orig_pos.dim() == 3 && orig_pos.size(0) == num_layers &&
                  orig_pos.size(1) == N && new_pos.sizes() == orig_pos.sizes() && new_pos.scalar_type() == at::kLong,
              "orig_positions/new_positions: expected int64 [layers, N, B]");
  TORCH_CHECK(k_down.has_value() == k_up.has_value() && v_down.has_value() == v_up.has_value(),
              "k_down/k_up and v_down/v_up: give both or neither");
  return N;
}

}  // namespace pskernels
