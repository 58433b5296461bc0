// Registers the ops as torch.ops.pskernels.*: the schemas, then the CPU and (when built) CUDA entry points
// declared in ops.h. The fake (meta) implementations for torch.compile live next to each op's adapter in
// pskernels/_ext/<op>.py.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(pskernels, m) {
  m.def(
      "multi_branch_attention(Tensor q, Tensor[] keys, Tensor[] values, Tensor seq_lens, Tensor left_pad, "
      "Tensor? shifts, Tensor? segment_positions, Tensor? query_positions, Tensor? inv_freq, bool rope_neox, "
      "bool causal_last, float scale, float softcap, int window, Tensor groups, Tensor? temperature, "
      "Tensor? lse_scale, Tensor? log_weight) -> (Tensor, Tensor)");
  m.def("merge_states(Tensor outs, Tensor lses) -> (Tensor, Tensor)");
  m.def("rotate_keys(Tensor k, Tensor delta, Tensor inv_freq, bool neox) -> Tensor");
  m.def(
      "map_kv_caches(Tensor[] keys, Tensor[] values, int num_layers, Tensor orig_pos, Tensor new_pos, "
      "Tensor inv_freq, bool neox, Tensor? k_down, Tensor? k_up, Tensor? k_gate, Tensor? v_down, Tensor? v_up, "
      "Tensor? v_gate) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pskernels, CPU, m) {
  m.impl("multi_branch_attention", &pskernels::cpu::multi_branch_attention);
  m.impl("merge_states", &pskernels::cpu::merge_states);
  m.impl("rotate_keys", &pskernels::cpu::rotate_keys);
  m.impl("map_kv_caches", &pskernels::cpu::map_kv_caches);
}

#ifdef PSKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(pskernels, CUDA, m) {
  m.impl("multi_branch_attention", &pskernels::cuda::multi_branch_attention);
  m.impl("merge_states", &pskernels::cuda::merge_states);
  m.impl("rotate_keys", &pskernels::cuda::rotate_keys);
  m.impl("map_kv_caches", &pskernels::cuda::map_kv_caches);
}
#endif

// Importable as pskernels._C; the ops live in torch.ops.pskernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef PSKERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
