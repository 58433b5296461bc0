// Argument checks of multi_branch_attention, shared by its CPU and CUDA launchers. Python validates first with
// friendlier messages; these TORCH_CHECKs make direct torch.ops.pskernels.* calls safe (an error, never a crash).
#pragma once

#include <torch/extension.h>

namespace pskernels {

inline void check_int_table(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected dtype int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ", cols,
              "], got ", t.sizes());
}

// seq_lens / left_pad as checked: int64 [S, B], contiguous, on the host. Callers may pass them on the host (no
// synchronisation: what the Python adapter does) or on q's device (one device-to-host copy).
struct HostLengths {
  at::Tensor lens, pads;
};

inline HostLengths check_segments(const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& seq_lens,
                           const at::Tensor& left_pad, const c10::optional<at::Tensor>& shifts,
                           const c10::optional<at::Tensor>& segment_positions,
                           const c10::optional<at::Tensor>& query_positions, const c10::optional<at::Tensor>& inv_freq,
                           int64_t window, const at::Tensor& groups, const c10::optional<at::Tensor>& temperature,
                           const c10::optional<at::Tensor>& lse_scale, const c10::optional<at::Tensor>& log_weight) {
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dims [B, Hq, Lq, D], got ", q.sizes());
  TORCH_CHECK(q.size(3) >= 1, "q: expected a head dim (last dimension) >= 1, got shape ", q.sizes());
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, "q: expected a contiguous last dimension, got strides ", q.strides());
  const int64_t S = static_cast<int64_t>(keys.size());
  TORCH_CHECK(S >= 1, "keys: expected at least one segment");
  TORCH_CHECK(static_cast<int64_t>(values.size()) == S, "values: expected ", S, " segments, got ", values.size());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = keys[0].dim() == 4 ? keys[0].size(1) : -1;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "keys[0]: kv heads must divide q's ", Hq, " heads, got shape ", keys[0].sizes());
  const int64_t Dv = values[0].dim() == 4 ? values[0].size(3) : -1;
  for (int64_t s = 0; s < S; ++s) {
    const auto &k = keys[s], &v = values[s];
    TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == Hkv && k.size(3) == D, "keys[", s,
                "]: expected shape [", B, ", ", Hkv, ", L, ", D, "], got ", k.sizes());
    TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == Hkv && v.size(2) == k.size(2) && v.size(3) == Dv,
                "values[", s, "]: expected shape [", B, ", ", Hkv, ", ", k.size(2), ", ", Dv, "], got ", v.sizes());
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "keys[", s, "]/values[", s,
                "]: expected dtype ", q.scalar_type(), ", got ", k.scalar_type(), "/", v.scalar_type());
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "keys[", s, "]/values[", s,
                "]: expected device ", q.device());
    TORCH_CHECK((k.size(3) <= 1 || k.stride(3) == 1) && (v.size(3) <= 1 || v.stride(3) == 1), "keys[", s,
                "]/values[", s, "]: expected a contiguous last dimension");
  }
  check_int_table(seq_lens, "seq_lens", S, B);
  check_int_table(left_pad, "left_pad", S, B);
  for (const auto* t : {&seq_lens, &left_pad})
    TORCH_CHECK(t->is_cpu() || t->device() == q.device(), t == &seq_lens ? "seq_lens" : "left_pad",
                ": expected device cpu or ", q.device(), " (q's), got ", t->device());
  HostLengths host{seq_lens.to(at::kCPU).contiguous(), left_pad.to(at::kCPU).contiguous()};
  {
    auto la = host.lens.accessor<int64_t, 2>(), pa = host.pads.accessor<int64_t, 2>();
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(la[s][b] >= 0 && la[s][b] <= keys[s].size(2), "seq_lens[", s, ", ", b, "] = ", la[s][b],
                    " is outside [0, ", keys[s].size(2), "]");
        TORCH_CHECK(pa[s][b] >= 0 && pa[s][b] <= la[s][b], "left_pad[", s, ", ", b, "] = ", pa[s][b],
                    " is outside [0, seq_lens = ", la[s][b], "]");
      }
  }
  if (shifts.has_value()) {
    check_int_table(*shifts, "position_shifts", S, B);
    TORCH_CHECK(inv_freq.has_value(), "inv_freq: required with position_shifts");
  }
  if (inv_freq.has_value()) {
    TORCH_CHECK(inv_freq->scalar_type() == at::kFloat && inv_freq->dim() == 1 && 2 * inv_freq->size(0) <= D,
                "inv_freq: expected float32 [rotary_dim / 2] with rotary_dim <= ", D, ", got ", inv_freq->sizes(), " ",
                inv_freq->scalar_type());
  }
  if (window > 0) {
    TORCH_CHECK(segment_positions.has_value() && query_positions.has_value(),
                "sliding_window: segment_positions and query_positions are required");
    check_int_table(*segment_positions, "segment_positions", S, B);
    check_int_table(*query_positions, "query_positions", B, Lq);
  }
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.dim() == 1 && groups.size(0) == S,
              "segment_groups: expected int64 [", S, "], got ", groups.sizes());
  int64_t G = 0;
  {
    const auto g = groups.to(at::kCPU).contiguous();
    const int64_t* gp = g.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK(gp[s] >= 0, "segment_groups[", s, "] = ", gp[s], ": expected a group id >= 0");
      G = std::max(G, gp[s] + 1);
    }
  }
  for (const auto* kn : {&temperature, &lse_scale, &log_weight}) {
    if (kn->has_value()) {
      TORCH_CHECK((*kn)->scalar_type() == at::kFloat && (*kn)->dim() == 2 && (*kn)->size(0) == G && (*kn)->size(1) == Hq,
                  "calibration knob: expected float32 [", G, ", ", Hq, "], got ", (*kn)->sizes());
    }
  }
  return host;
}

}  // namespace pskernels
