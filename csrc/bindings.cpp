// Registers the ops as torch.ops.pskernels.* (schemas here; CPU and CUDA kernels register their
// implementations below; fake/meta implementations for torch.compile live in pskernels/_ext.py).
#include <torch/extension.h>

#include <vector>

namespace pskernels {
namespace cpu {
std::tuple<at::Tensor, at::Tensor> multi_branch_attention(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& seq_lens,
    const at::Tensor& left_pad, const c10::optional<at::Tensor>& shifts,
    const c10::optional<at::Tensor>& segment_positions, const c10::optional<at::Tensor>& query_positions,
    const c10::optional<at::Tensor>& inv_freq, bool rope_neox, bool causal_last, double scale, double softcap,
    int64_t window, const at::Tensor& groups, const c10::optional<at::Tensor>& temperature,
    const c10::optional<at::Tensor>& lse_scale, const c10::optional<at::Tensor>& log_weight);
std::tuple<at::Tensor, at::Tensor> merge_states(const at::Tensor& outs, const at::Tensor& lses);
at::Tensor rotate_keys(const at::Tensor& k, const at::Tensor& delta, const at::Tensor& inv_freq, bool neox);
std::vector<at::Tensor> map_kv_caches(at::TensorList keys, at::TensorList values, int64_t num_layers,
                                      const at::Tensor& orig_pos, const at::Tensor& new_pos,
                                      const at::Tensor& inv_freq, bool neox, const c10::optional<at::Tensor>& k_down,
                                      const c10::optional<at::Tensor>& k_up, const c10::optional<at::Tensor>& k_gate,
                                      const c10::optional<at::Tensor>& v_down, const c10::optional<at::Tensor>& v_up,
                                      const c10::optional<at::Tensor>& v_gate);
}  // namespace cpu
}  // namespace pskernels

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
extern "C" int pskernels_cuda_built() { return 1; }
#endif

// Importable as pskernels._C; the ops live in torch.ops.pskernels.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef PSKERNELS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
