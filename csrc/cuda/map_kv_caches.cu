// CUDA map_kv_caches (same contract as csrc/cpu/map_kv_caches.cpp): every (layer, branch) pair in ONE launch:
// grid.y = pair, grid.x = (b, j) rows; a device table holds each pair's input/output pointers, strides and sizes.
// A block maps one cache row (all heads, K and V); the low-rank residual runs on a shared-memory copy of a chunk
// of heads.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <vector>

#include "../map_kv_caches_checks.h"
#include "../ops.h"
#include "device_helpers.cuh"

namespace pskernels {
namespace cuda {
namespace {

constexpr int kMapThreads = 128;
constexpr int kPairFields = 16;
constexpr int kMapSmemFloats = 8192;  // 32 KB: x[hc][maxD] + tmp[hc][maxR]

struct MapParams {
  const int64_t* tab;  // [pairs, kPairFields]
  const int64_t* orig;  // [NL, N, B]
  const int64_t* newp;  // [NL, N, B]
  const float* inv_freq;
  const float *kd, *ku, *kg, *vd, *vu, *vg;  // low-rank factors [NL, H, ...] and gates [NL, H] (or null)
  int N, B, rd, rk, rv, hc;
  bool neox;
};

// x[0:D] += gate * (x @ down) @ up for one head (CPU low_rank), heads h0..h0+nh of a shared-memory chunk.
__device__ __forceinline__ void low_rank_chunk(float* x, float* tmp, int D, int r, int nh, int h0, int64_t lh,
                                               const float* down, const float* up, const float* gate) {
  for (int idx = threadIdx.x; idx < nh * r; idx += blockDim.x) {
    const int hh = idx / r, c = idx - hh * r;
    const float* dn = down + (lh + h0 + hh) * D * r;
    const float* xv = x + hh * D;
    float acc = 0.f;
    for (int d = 0; d < D; ++d) acc += xv[d] * dn[d * r + c];
    tmp[idx] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int hh = idx / D, d = idx - hh * D;
    const float* u = up + (lh + h0 + hh) * r * D;
    const float* t = tmp + hh * r;
    float acc = 0.f;
    for (int c = 0; c < r; ++c) acc += t[c] * u[c * D + d];
    const float g = gate ? 1.f / (1.f + __expf(-gate[lh + h0 + hh])) : 1.f;
    x[idx] += g * acc;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kMapThreads) map_kv_kernel(const MapParams p) {
  extern __shared__ float smem[];
  __shared__ float2 csa[kMaxRotaryHalf], csb[kMaxRotaryHalf];
  const int pair = blockIdx.y;
  const int64_t* e = p.tab + static_cast<int64_t>(pair) * kPairFields;
  const int64_t L = e[10];
  const int H = static_cast<int>(e[11]), D = static_cast<int>(e[12]), Dv = static_cast<int>(e[13]);
  const int64_t row = blockIdx.x;  // b * Lmax + j
  const int64_t Lmax = e[14];
  const int64_t b = row / Lmax, j = row - b * Lmax;
  if (j >= L) return;
  const int l = pair / p.N;
  const int64_t o = p.orig[static_cast<int64_t>(pair) * p.B + b], n = p.newp[static_cast<int64_t>(pair) * p.B + b];
  const bool klr = p.kd != nullptr, vlr = p.vd != nullptr;
  const int half = p.rd >> 1;
  for (int t = threadIdx.x; t < half; t += blockDim.x) {
    if (klr) {
      csa[t] = rope_cs(-static_cast<float>(o + j), p.inv_freq[t]);
      csb[t] = rope_cs(static_cast<float>(n + j), p.inv_freq[t]);
    } else {
      csa[t] = rope_cs(static_cast<float>(n - o), p.inv_freq[t]);
    }
  }
  __syncthreads();
  const T* kp = reinterpret_cast<const T*>(e[0]) + b * e[4] + j * e[6];
  const T* vp = reinterpret_cast<const T*>(e[1]) + b * e[7] + j * e[9];
  T* ko = reinterpret_cast<T*>(e[2]);
  T* vo = reinterpret_cast<T*>(e[3]);
  const int64_t ksh = e[5], vsh = e[8];
  const int64_t lh = static_cast<int64_t>(l) * H;
  auto orow = [&](int h) { return ((b * H + h) * L + j); };

  // Keys.
  if (!klr) {
    for (int idx = threadIdx.x; idx < H * D; idx += blockDim.x) {
      const int h = idx / D, d = idx - h * D;
      ko[orow(h) * D + d] = static_cast<T>(rope_elem(kp + h * ksh, d, p.rd, p.neox, csa));
    }
  } else {
    float* x = smem;
    float* tmp = smem + p.hc * max(D, Dv);
    for (int h0 = 0; h0 < H; h0 += p.hc) {
      const int nh = min(p.hc, H - h0);
      for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
        const int hh = idx / D, d = idx - hh * D;
        x[idx] = rope_elem(kp + (h0 + hh) * ksh, d, p.rd, p.neox, csa);  // un-rotate at -(o + j)
      }
      __syncthreads();
      low_rank_chunk(x, tmp, D, p.rk, nh, h0, lh, p.kd, p.ku, p.kg);
      for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
        const int hh = idx / D, d = idx - hh * D;
        ko[orow(h0 + hh) * D + d] = static_cast<T>(rope_elem(x + hh * D, d, p.rd, p.neox, csb));  // at n + j
      }
      __syncthreads();
    }
  }
  // Values.
  if (!vlr) {
    for (int idx = threadIdx.x; idx < H * Dv; idx += blockDim.x) {
      const int h = idx / Dv, d = idx - h * Dv;
      vo[orow(h) * Dv + d] = vp[h * vsh + d];
    }
  } else {
    float* x = smem;
    float* tmp = smem + p.hc * max(D, Dv);
    for (int h0 = 0; h0 < H; h0 += p.hc) {
      const int nh = min(p.hc, H - h0);
      for (int idx = threadIdx.x; idx < nh * Dv; idx += blockDim.x) {
        const int hh = idx / Dv, d = idx - hh * Dv;
        x[idx] = to_f(vp[(h0 + hh) * vsh + d]);
      }
      __syncthreads();
      low_rank_chunk(x, tmp, Dv, p.rv, nh, h0, lh, p.vd, p.vu, p.vg);
      for (int idx = threadIdx.x; idx < nh * Dv; idx += blockDim.x) {
        const int hh = idx / Dv, d = idx - hh * Dv;
        vo[orow(h0 + hh) * Dv + d] = static_cast<T>(x[idx]);
      }
      __syncthreads();
    }
  }
}

}  // namespace

std::vector<at::Tensor> map_kv_caches(at::TensorList keys, at::TensorList values, int64_t num_layers,
                                      const at::Tensor& orig_pos, const at::Tensor& new_pos,
                                      const at::Tensor& inv_freq, bool neox, const c10::optional<at::Tensor>& k_down,
                                      const c10::optional<at::Tensor>& k_up, const c10::optional<at::Tensor>& k_gate,
                                      const c10::optional<at::Tensor>& v_down, const c10::optional<at::Tensor>& v_up,
                                      const c10::optional<at::Tensor>& v_gate) {
  const int64_t total = static_cast<int64_t>(keys.size());
  const int64_t N = check_map_kv_caches_args(keys, values, num_layers, orig_pos, new_pos, k_down, k_up, v_down, v_up);
  TORCH_CHECK(total > 0, "keys: expected at least one (layer, branch) pair");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) <= kMaxRotaryHalf,
              "inv_freq: expected float32 [rotary_dim / 2] with rotary_dim <= ", 2 * kMaxRotaryHalf);
  TORCH_CHECK(total <= 65535, "map_kv_caches (cuda): at most 65535 (layer, branch) pairs per call, got ", total);
  const auto dev = keys[0].device();
  TORCH_CHECK(dev.is_cuda(), "map_kv_caches (cuda): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(dev);
  const int rd = static_cast<int>(2 * inv_freq.size(0));
  const int64_t B = orig_pos.size(2);
  const auto dtype = keys[0].scalar_type();

  auto fdev = [&](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(dev, at::kFloat).contiguous() : at::Tensor();
  };
  at::Tensor kd = fdev(k_down), ku = fdev(k_up), vd = fdev(v_down), vu = fdev(v_up);
  at::Tensor kg = kd.defined() ? fdev(k_gate) : at::Tensor(), vg = vd.defined() ? fdev(v_gate) : at::Tensor();
  auto inv = inv_freq.to(dev).contiguous();
  auto op_ = orig_pos.to(dev).contiguous(), np_ = new_pos.to(dev).contiguous();

  auto tab = at::empty({total, kPairFields}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* tp = tab.data_ptr<int64_t>();
  std::vector<at::Tensor> result;
  result.reserve(2 * total);
  int64_t Lmax = 0, maxD = 1, H0 = -1, D0 = -1, Dv0 = -1;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t l = idx / N, n = idx % N;
    const at::Tensor &k = keys[idx], &v = values[idx];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                    k.size(2) == v.size(2) && k.size(0) == B,
                "keys[", l, "][", n, "]/values: expected [B, H, L, D] pairs with B = ", B);
    TORCH_CHECK(k.device() == dev && v.device() == dev, "map_kv_caches (cuda): expected all tensors on ", dev);
    TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
                "map_kv_caches (cuda): expected one dtype for all keys/values, got ", k.scalar_type(), "/",
                v.scalar_type(), " vs ", dtype);
    TORCH_CHECK((k.size(3) <= 1 || k.stride(3) == 1) && (v.size(3) <= 1 || v.stride(3) == 1),
                "keys/values: expected a contiguous last dimension");
    const int64_t H = k.size(1), L = k.size(2), D = k.size(3), Dv = v.size(3);
    TORCH_CHECK(rd <= D, "inv_freq: rotary_dim exceeds head_dim");
    if (kd.defined() || vd.defined()) {
      if (H0 < 0) {
        H0 = H;
        D0 = D;
        Dv0 = Dv;
      }
      TORCH_CHECK(H == H0 && D == D0 && Dv == Dv0,
                  "map_kv_caches (cuda): with low-rank parameters every pair must share H, D, Dv");
    }
    auto ko = at::empty({B, H, L, D}, k.options());
    auto vo = at::empty({B, H, L, Dv}, v.options());
    int64_t* e = tp + idx * kPairFields;
    e[0] = reinterpret_cast<int64_t>(k.data_ptr());
    e[1] = reinterpret_cast<int64_t>(v.data_ptr());
    e[2] = reinterpret_cast<int64_t>(ko.data_ptr());
    e[3] = reinterpret_cast<int64_t>(vo.data_ptr());
    e[4] = k.stride(0);
    e[5] = k.stride(1);
    e[6] = k.stride(2);
    e[7] = v.stride(0);
    e[8] = v.stride(1);
    e[9] = v.stride(2);
    e[10] = L;
    e[11] = H;
    e[12] = D;
    e[13] = Dv;
    e[14] = 0;  // Lmax, filled below
    e[15] = 0;
    Lmax = std::max(Lmax, L);
    maxD = std::max({maxD, D, Dv});
    result.push_back(ko);
    result.push_back(vo);
  }
  for (int64_t idx = 0; idx < total; ++idx) tp[idx * kPairFields + 14] = std::max<int64_t>(Lmax, 1);
  int64_t rk = 0, rv = 0;
  if (kd.defined()) {
    TORCH_CHECK(kd.dim() == 4 && kd.size(0) == num_layers && kd.size(1) == H0 && kd.size(2) == D0,
                "k_down: expected [layers, H, D, r], got ", kd.sizes());
    rk = kd.size(3);
    TORCH_CHECK(ku.dim() == 4 && ku.size(0) == num_layers && ku.size(1) == H0 && ku.size(2) == rk && ku.size(3) == D0,
                "k_up: expected [layers, H, r, D], got ", ku.sizes());
    TORCH_CHECK(!kg.defined() || kg.numel() == num_layers * H0, "k_gate: expected [layers, H], got ", kg.sizes());
  }
  if (vd.defined()) {
    TORCH_CHECK(vd.dim() == 4 && vd.size(0) == num_layers && vd.size(1) == H0 && vd.size(2) == Dv0,
                "v_down: expected [layers, H, Dv, r], got ", vd.sizes());
    rv = vd.size(3);
    TORCH_CHECK(vu.dim() == 4 && vu.size(0) == num_layers && vu.size(1) == H0 && vu.size(2) == rv && vu.size(3) == Dv0,
                "v_up: expected [layers, H, r, Dv], got ", vu.sizes());
    TORCH_CHECK(!vg.defined() || vg.numel() == num_layers * H0, "v_gate: expected [layers, H], got ", vg.sizes());
  }
  if (B * Lmax == 0) return result;
  TORCH_CHECK(B * Lmax <= INT32_MAX, "map_kv_caches (cuda): B * L too large");

  MapParams p{};
  auto dtab = tab.to(at::TensorOptions().device(dev).dtype(at::kLong), /*non_blocking=*/true);
  p.tab = dtab.data_ptr<int64_t>();
  p.orig = op_.data_ptr<int64_t>();
  p.newp = np_.data_ptr<int64_t>();
  p.inv_freq = inv.data_ptr<float>();
  p.kd = kd.defined() ? kd.data_ptr<float>() : nullptr;
  p.ku = ku.defined() ? ku.data_ptr<float>() : nullptr;
  p.kg = kg.defined() ? kg.data_ptr<float>() : nullptr;
  p.vd = vd.defined() ? vd.data_ptr<float>() : nullptr;
  p.vu = vu.defined() ? vu.data_ptr<float>() : nullptr;
  p.vg = vg.defined() ? vg.data_ptr<float>() : nullptr;
  p.N = static_cast<int>(N);
  p.B = static_cast<int>(B);
  p.rd = rd;
  p.rk = static_cast<int>(rk);
  p.rv = static_cast<int>(rv);
  p.neox = neox;
  size_t smem = 0;
  if (kd.defined() || vd.defined()) {
    const int64_t maxR = std::max<int64_t>({rk, rv, 1});
    const int64_t hc = std::max<int64_t>(1, std::min<int64_t>(H0, kMapSmemFloats / (maxD + maxR)));
    p.hc = static_cast<int>(hc);
    smem = sizeof(float) * static_cast<size_t>(hc * (maxD + maxR));
    const auto* props = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(smem <= props->sharedMemPerBlockOptin, "map_kv_caches (cuda): low-rank rank too large");
  }
  const dim3 grid(static_cast<unsigned>(B * Lmax), static_cast<unsigned>(total));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "map_kv_caches_cuda", [&] {
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(map_kv_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    map_kv_kernel<scalar_t><<<grid, kMapThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace cuda
}  // namespace pskernels
