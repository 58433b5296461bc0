// CPU map_kv_caches: the batched cache mapping (all layers x branches in one call).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../map_kv_caches_checks.h"
#include "../ops.h"
#include "pskernels/math.h"

namespace pskernels {
namespace cpu {

namespace {
// x <- x + sigmoid(gate) * (x @ down) @ up, for one head: down [D, r], up [r, D] (float32, contiguous).
inline void low_rank(float* x, float* tmp, const float* down, const float* up, float gate, int64_t D, int64_t r) {
  for (int64_t c = 0; c < r; ++c) {
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += x[d] * down[d * r + c];
    tmp[c] = acc;
  }
  for (int64_t d = 0; d < D; ++d) {
    float acc = 0.f;
    for (int64_t c = 0; c < r; ++c) acc += tmp[c] * up[c * D + d];
    x[d] += gate * acc;
  }
}

inline float gate_of(const c10::optional<at::Tensor>& g, int64_t l, int64_t h) {
  if (!g.has_value()) return 1.f;
  return 1.f / (1.f + expf(-g->index({l, h}).item<float>()));
}
}  // namespace

// keys[l * N + n] / values[l * N + n]: [B, H, L_n, D]; orig/new_pos: int64 [NL, N, B].
std::vector<at::Tensor> map_kv_caches(at::TensorList keys, at::TensorList values, int64_t num_layers,
                                      const at::Tensor& orig_pos, const at::Tensor& new_pos,
                                      const at::Tensor& inv_freq, bool neox,
                                      const c10::optional<at::Tensor>& k_down, const c10::optional<at::Tensor>& k_up,
                                      const c10::optional<at::Tensor>& k_gate,
                                      const c10::optional<at::Tensor>& v_down, const c10::optional<at::Tensor>& v_up,
                                      const c10::optional<at::Tensor>& v_gate) {
  const int64_t total = static_cast<int64_t>(keys.size());
  const int64_t N = check_map_kv_caches_args(keys, values, num_layers, orig_pos, new_pos, k_down, k_up, v_down, v_up);
  const int rd = static_cast<int>(2 * inv_freq.size(0));
  auto inv = inv_freq.contiguous();
  auto op_ = orig_pos.contiguous(), np_ = new_pos.contiguous();
  auto prep = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous().to(at::kFloat) : at::Tensor(); };
  at::Tensor kd = prep(k_down), ku = prep(k_up), vd = prep(v_down), vu = prep(v_up);
  std::vector<at::Tensor> result;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t l = idx / N, n = idx % N;
    const at::Tensor &k = keys[idx], &v = values[idx];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                    k.size(2) == v.size(2) && k.size(0) == orig_pos.size(2),
                "keys[", l, "][", n, "]/values: expected [B, H, L, D] pairs with B = ", orig_pos.size(2));
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "map_kv_caches (cpu): expected CPU tensors");
    TORCH_CHECK((k.size(3) <= 1 || k.stride(3) == 1) && (v.size(3) <= 1 || v.stride(3) == 1),
                "keys/values: expected a contiguous last dimension");
    const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
    TORCH_CHECK(rd <= D, "inv_freq: rotary_dim exceeds head_dim");
    auto ko = at::empty({B, H, L, D}, k.options());
    auto vo = at::empty({B, H, L, Dv}, v.options());
    std::vector<float> kg(H, 1.f), vg(H, 1.f);
    for (int64_t h = 0; h < H; ++h) {
      kg[h] = gate_of(k_gate, l, h);
      vg[h] = gate_of(v_gate, l, h);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "map_kv_caches_cpu", [&] {
      const scalar_t* kp = k.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      scalar_t* kop = ko.data_ptr<scalar_t>();
      scalar_t* vop = vo.data_ptr<scalar_t>();
      const int64_t* o = op_.data_ptr<int64_t>() + (l * N + n) * B;
      const int64_t* p = np_.data_ptr<int64_t>() + (l * N + n) * B;
      const float* fp = inv.data_ptr<float>();
      const int64_t rk = kd.defined() ? kd.size(3) : 0, rv = vd.defined() ? vd.size(3) : 0;
      at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> x(std::max(D, Dv)), tmp(std::max<int64_t>(std::max(rk, rv), 1));
        for (int64_t r = begin; r < end; ++r) {
          const int64_t j = r % L, h = (r / L) % H, b = r / L / H;
          const scalar_t* src = kp + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
          for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(src[d]);
          if (kd.defined()) {
            rope_rotate(x.data(), rd, neox, fp, -static_cast<float>(o[b] + j));
            low_rank(x.data(), tmp.data(), kd.data_ptr<float>() + (l * H + h) * D * rk,
                     ku.data_ptr<float>() + (l * H + h) * rk * D, kg[h], D, rk);
            rope_rotate(x.data(), rd, neox, fp, static_cast<float>(p[b] + j));
          } else {
            rope_rotate(x.data(), rd, neox, fp, static_cast<float>(p[b] - o[b]));
          }
          for (int64_t d = 0; d < D; ++d) kop[r * D + d] = static_cast<scalar_t>(x[d]);
          const scalar_t* vs = vp + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
          for (int64_t d = 0; d < Dv; ++d) x[d] = static_cast<float>(vs[d]);
          if (vd.defined())
            low_rank(x.data(), tmp.data(), vd.data_ptr<float>() + (l * H + h) * Dv * rv,
                     vu.data_ptr<float>() + (l * H + h) * rv * Dv, vg[h], Dv, rv);
          for (int64_t d = 0; d < Dv; ++d) vop[r * Dv + d] = static_cast<scalar_t>(x[d]);
        }
      });
    });
    result.push_back(ko);
    result.push_back(vo);
  }
  return result;
}

}  // namespace cpu
}  // namespace pskernels
