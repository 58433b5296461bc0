// The C++ entry points of every torch.ops.pskernels.* op: pskernels::cpu::<op> is defined in csrc/cpu/<op>.cpp,
// pskernels::cuda::<op> in csrc/cuda/<op>.cu (compiled only with PSKERNELS_WITH_CUDA). bindings.cpp registers
// them under the schemas it defines, so each signature here must match its schema (int -> int64_t,
// float -> double, Tensor? -> c10::optional<at::Tensor>, Tensor[] -> at::TensorList).
//
// Each signature is written once, as a function type that declares both the CPU and the CUDA entry point.
// The op files include this header, so a definition whose signature drifts from it declares a different
// function and leaves the registered entry point undefined: importing the extension then fails instead of
// dispatching to a kernel with the wrong arguments.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace pskernels {

// Attention of q over S key/value segments kept where they are stored; returns (out, lse).
using MultiBranchAttentionOp = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& seq_lens,
    const at::Tensor& left_pad, const c10::optional<at::Tensor>& shifts,
    const c10::optional<at::Tensor>& segment_positions, const c10::optional<at::Tensor>& query_positions,
    const c10::optional<at::Tensor>& inv_freq, bool rope_neox, bool causal_last, double scale, double softcap,
    int64_t window, const at::Tensor& groups, const c10::optional<at::Tensor>& temperature,
    const c10::optional<at::Tensor>& lse_scale, const c10::optional<at::Tensor>& log_weight);

// Log-sum-exp merge of N partial attention states: outs [N, B, H, L, Dv], lses [N, B, H, L] -> (out, lse).
using MergeStatesOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& outs, const at::Tensor& lses);

// RoPE rotation of cached keys k [B, H, L, D] by a per-token position delta [B, L].
using RotateKeysOp = at::Tensor(const at::Tensor& k, const at::Tensor& delta, const at::Tensor& inv_freq, bool neox);

// Re-positions (and optionally low-rank transforms) every (layer, branch) K/V cache in one call;
// returns [k_0, v_0, k_1, v_1, ...] in keys' order.
using MapKvCachesOp = std::vector<at::Tensor>(
    at::TensorList keys, at::TensorList values, int64_t num_layers, const at::Tensor& orig_pos,
    const at::Tensor& new_pos, const at::Tensor& inv_freq, bool neox, const c10::optional<at::Tensor>& k_down,
    const c10::optional<at::Tensor>& k_up, const c10::optional<at::Tensor>& k_gate,
    const c10::optional<at::Tensor>& v_down, const c10::optional<at::Tensor>& v_up,
    const c10::optional<at::Tensor>& v_gate);

namespace cpu {
MultiBranchAttentionOp multi_branch_attention;
MergeStatesOp merge_states;
RotateKeysOp rotate_keys;
MapKvCachesOp map_kv_caches;
}  // namespace cpu

namespace cuda {
MultiBranchAttentionOp multi_branch_attention;
MergeStatesOp merge_states;
RotateKeysOp rotate_keys;
MapKvCachesOp map_kv_caches;
}  // namespace cuda

}  // namespace pskernels
