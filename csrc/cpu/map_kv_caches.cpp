// CPU map_kv_caches: the batched cache mapping (all layers x branches in one call).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <vector>

#include "../map_kv_caches_checks.h"
#include "../ops.h"
#include "blas.h"

namespace pskernels {
namespace cpu {

namespace {
constexpr int64_t kRowBlock = 256;  // slots mapped together (their low-rank products are two sgemm calls)

// x[n, D] <- x + gate * (x @ down) @ up for one head: down [D, r], up [r, D] (float32, contiguous); t [n, r] and
// acc [n, D] are scratch. Through BLAS sgemm where libtorch has one (see blas.h), else loops along the contiguous
// dimension.
void low_rank(float* x, float* t, float* acc, const float* down, const float* up, float gate, int64_t n, int64_t D,
              int64_t r, SgemmFn sgemm) {
  if (sgemm != nullptr) {
    gemm_row_major(sgemm, false, static_cast<int>(n), static_cast<int>(r), static_cast<int>(D), x,
                   static_cast<int>(D), down, static_cast<int>(r), 0.f, t, static_cast<int>(r));
    gemm_row_major(sgemm, false, static_cast<int>(n), static_cast<int>(D), static_cast<int>(r), t,
                   static_cast<int>(r), up, static_cast<int>(D), 0.f, acc, static_cast<int>(D));
  } else {
    std::fill(t, t + n * r, 0.f);
    std::fill(acc, acc + n * D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t c = 0; c < r; ++c) t[j * r + c] += x[j * D + d] * down[d * r + c];
      for (int64_t c = 0; c < r; ++c)
        for (int64_t d = 0; d < D; ++d) acc[j * D + d] += t[j * r + c] * up[c * D + d];
    }
  }
  for (int64_t i = 0; i < n * D; ++i) x[i] += gate * acc[i];
}

// x <- R(angle) x with the angle's cos/sin per frequency precomputed (rope_rotate's arithmetic, table-driven; the
// layouts in separate loops so that each vectorises).
inline void rotate(float* x, int half, bool neox, const float* c, const float* s) {
  if (neox) {
#pragma omp simd
    for (int i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i] + x1 * s[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      x[2 * i] = x1 * c[i] - x2 * s[i];
      x[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
  }
}

// cos/sin of sign * (first + j) * inv_freq[i] for j < rows, i < half: [rows, half] each.
void fill_table(std::vector<float>& cs, std::vector<float>& sn, int64_t rows, int half, const float* inv_freq,
                int64_t first, float sign) {
  cs.resize(rows * half);
  sn.resize(rows * half);
  for (int64_t j = 0; j < rows; ++j)
    for (int i = 0; i < half; ++i) {
      const float ang = sign * static_cast<float>(first + j) * inv_freq[i];
      cs[j * half + i] = cosf(ang);
      sn[j * half + i] = sinf(ang);
    }
}

// Rotation tables of one (orig, new, slots) mapping. RoPE depends on the position only, so one table serves every
// head, batch row and layer with the same positions (the trig was most of this op's time when done per element).
struct RotationTables {
  std::vector<float> to_raw_c, to_raw_s;  // angle -(o + j): the key as if at position 0 (mapped keys)
  std::vector<float> to_new_c, to_new_s;  // angle p + j (mapped keys), or the delta p - o (one row: plain keys)
};

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
  const int half = static_cast<int>(inv_freq.size(0));
  auto inv = inv_freq.contiguous().to(at::kFloat);
  auto op_ = orig_pos.contiguous(), np_ = new_pos.contiguous();
  auto prep = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous().to(at::kFloat) : at::Tensor(); };
  at::Tensor kd = prep(k_down), ku = prep(k_up), vd = prep(v_down), vu = prep(v_up);
  const bool mapped_keys = kd.defined();
  const int64_t B = orig_pos.size(2);
  const int64_t H = total ? keys[0].size(1) : 0;
  std::vector<at::Tensor> result;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t l = idx / N, n = idx % N;
    const at::Tensor &k = keys[idx], &v = values[idx];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                    k.size(2) == v.size(2) && k.size(0) == B,
                "keys[", l, "][", n, "]/values: expected [B, H, L, D] pairs with B = ", B);
    TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "map_kv_caches (cpu): expected CPU tensors");
    TORCH_CHECK((k.size(3) <= 1 || k.stride(3) == 1) && (v.size(3) <= 1 || v.stride(3) == 1),
                "keys/values: expected a contiguous last dimension");
    TORCH_CHECK(k.size(1) == H, "keys[", l, "][", n, "]: expected ", H, " kv heads as keys[0][0], got ", k.size(1));
    TORCH_CHECK(2 * half <= k.size(3), "inv_freq: rotary_dim exceeds head_dim");
    TORCH_CHECK(!mapped_keys || (kd.size(0) == num_layers && kd.size(1) == k.size(1) && kd.size(2) == k.size(3)),
                "k_down: expected [layers, H, D, r] = [", num_layers, ", ", k.size(1), ", ", k.size(3), ", r]");
    TORCH_CHECK(!vd.defined() || (vd.size(0) == num_layers && vd.size(1) == v.size(1) && vd.size(2) == v.size(3)),
                "v_down: expected [layers, H, Dv, r] = [", num_layers, ", ", v.size(1), ", ", v.size(3), ", r]");
    result.push_back(at::empty(k.sizes(), k.options()));
    result.push_back(at::empty(v.sizes(), v.options()));
  }

  // One table per distinct (orig, new, slots), built before the parallel region.
  const int64_t* o = op_.data_ptr<int64_t>();
  const int64_t* p = np_.data_ptr<int64_t>();
  const float* fp = inv.data_ptr<float>();
  std::map<std::tuple<int64_t, int64_t, int64_t>, int64_t> table_of;
  std::vector<RotationTables> tables;
  std::vector<int64_t> table_idx(total * B);
  for (int64_t idx = 0; idx < total; ++idx)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = mapped_keys ? keys[idx].size(2) : 1;
      const auto key = std::make_tuple(o[idx * B + b], p[idx * B + b], L);
      auto it = table_of.find(key);
      if (it == table_of.end()) {
        RotationTables t;
        const int64_t ob = o[idx * B + b], pb = p[idx * B + b];
        if (mapped_keys) {
          fill_table(t.to_raw_c, t.to_raw_s, L, half, fp, ob, -1.f);
          fill_table(t.to_new_c, t.to_new_s, L, half, fp, pb, 1.f);
        } else {
          fill_table(t.to_new_c, t.to_new_s, 1, half, fp, pb - ob, 1.f);
        }
        it = table_of.emplace(key, static_cast<int64_t>(tables.size())).first;
        tables.push_back(std::move(t));
      }
      table_idx[idx * B + b] = it->second;
    }

  // Sigmoid of every gate, read once (item() per element is a dispatcher call).
  auto gates = [&](const c10::optional<at::Tensor>& g) {
    std::vector<float> out(num_layers * H, 1.f);
    if (!g.has_value()) return out;
    auto gf = g->to(at::kFloat).contiguous();
    for (int64_t i = 0; i < num_layers * H; ++i) out[i] = 1.f / (1.f + expf(-gf.data_ptr<float>()[i]));
    return out;
  };
  const std::vector<float> kg = gates(k_gate), vg = gates(v_gate);

  // Work items: (layer x branch, row, head), each mapping one head's slots.
  const int64_t items = total * B * H;
  const SgemmFn sgemm = blas_sgemm();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x, t, acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % H, b = (item / H) % B, idx = item / H / B;
      const int64_t l = idx / N;
      const at::Tensor &k = keys[idx], &v = values[idx];
      at::Tensor &ko = result[2 * idx], &vo = result[2 * idx + 1];
      const int64_t L = k.size(2), D = k.size(3), Dv = v.size(3), W = std::max(D, Dv);
      const int64_t rk = mapped_keys ? kd.size(3) : 0, rv = vd.defined() ? vd.size(3) : 0;
      const int64_t rows = std::min(L, kRowBlock);
      x.resize(rows * W);
      t.resize(rows * std::max<int64_t>(std::max(rk, rv), 1));
      acc.resize(rows * W);
      const RotationTables& tab = tables[table_idx[idx * B + b]];
      const float* kdp = mapped_keys ? kd.data_ptr<float>() + (l * H + h) * D * rk : nullptr;
      const float* kup = mapped_keys ? ku.data_ptr<float>() + (l * H + h) * rk * D : nullptr;
      const float* vdp = vd.defined() ? vd.data_ptr<float>() + (l * H + h) * Dv * rv : nullptr;
      const float* vup = vd.defined() ? vu.data_ptr<float>() + (l * H + h) * rv * Dv : nullptr;
      const float kgate = kg[l * H + h], vgate = vg[l * H + h];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "map_kv_caches_cpu", [&] {
        const scalar_t* kp = k.data_ptr<scalar_t>() + b * k.stride(0) + h * k.stride(1);
        const scalar_t* vp = v.data_ptr<scalar_t>() + b * v.stride(0) + h * v.stride(1);
        scalar_t* kop = ko.data_ptr<scalar_t>() + (b * H + h) * L * D;
        scalar_t* vop = vo.data_ptr<scalar_t>() + (b * H + h) * L * Dv;
        for (int64_t j0 = 0; j0 < L; j0 += kRowBlock) {
          const int64_t n = std::min(kRowBlock, L - j0);
          for (int64_t j = 0; j < n; ++j) {  // keys: to position 0 (mapped) or by the delta (plain)
            const scalar_t* src = kp + (j0 + j) * k.stride(2);
            float* xr = x.data() + j * D;
            for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<float>(src[d]);
            if (mapped_keys)
              rotate(xr, half, neox, &tab.to_raw_c[(j0 + j) * half], &tab.to_raw_s[(j0 + j) * half]);
            else
              rotate(xr, half, neox, tab.to_new_c.data(), tab.to_new_s.data());
          }
          if (mapped_keys) {
            low_rank(x.data(), t.data(), acc.data(), kdp, kup, kgate, n, D, rk, sgemm);
            for (int64_t j = 0; j < n; ++j)
              rotate(x.data() + j * D, half, neox, &tab.to_new_c[(j0 + j) * half], &tab.to_new_s[(j0 + j) * half]);
          }
          for (int64_t i = 0; i < n * D; ++i) kop[j0 * D + i] = static_cast<scalar_t>(x[i]);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* src = vp + (j0 + j) * v.stride(2);
            for (int64_t d = 0; d < Dv; ++d) x[j * Dv + d] = static_cast<float>(src[d]);
          }
          if (vdp != nullptr) low_rank(x.data(), t.data(), acc.data(), vdp, vup, vgate, n, Dv, rv, sgemm);
          for (int64_t i = 0; i < n * Dv; ++i) vop[j0 * Dv + i] = static_cast<scalar_t>(x[i]);
        }
      });
    }
  });
  return result;
}

}  // namespace cpu
}  // namespace pskernels
