// CUDA rotate_keys (same contract as csrc/cpu/rotate_keys.cpp): one block per (b, position); the cos/sin table
// of that position's delta is computed once (in double, see rope_cs) and serves every head.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "../rotate_keys_checks.h"
#include "device_helpers.cuh"

namespace pskernels {
namespace cuda {
namespace {

constexpr int kRotThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kRotThreads)
    rotate_keys_kernel(const T* __restrict__ k, int64_t skb, int64_t skh, int64_t skl, const int64_t* __restrict__ delta,
                       const float* __restrict__ inv_freq, int rd, bool neox, T* __restrict__ out, int H, int64_t L,
                       int D) {
  __shared__ float2 cs[kMaxRotaryHalf];
  const int64_t row = blockIdx.x;  // b * L + l
  const int64_t b = row / L, l = row - b * L;
  const float pos = static_cast<float>(delta[row]);
  for (int t = threadIdx.x; t < (rd >> 1); t += blockDim.x) cs[t] = rope_cs(pos, inv_freq[t]);
  __syncthreads();
  for (int idx = threadIdx.x; idx < H * D; idx += blockDim.x) {
    const int h = idx / D, d = idx - h * D;
    const T* src = k + b * skb + h * skh + l * skl;
    out[((b * H + h) * L + l) * D + d] = static_cast<T>(rope_elem(src, d, rd, neox, cs));
  }
}

}  // namespace

at::Tensor rotate_keys(const at::Tensor& k, const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  check_rotate_keys_args(k, delta, inv_freq);
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  TORCH_CHECK(k.is_cuda(), "rotate_keys (cuda): expected CUDA tensors");
  TORCH_CHECK(inv_freq.size(0) <= kMaxRotaryHalf, "rotate_keys (cuda): rotary_dim must be <= ", 2 * kMaxRotaryHalf);
  const c10::cuda::CUDAGuard guard(k.device());
  auto dl = delta.to(k.device()).contiguous();
  auto inv = inv_freq.to(k.device()).contiguous();
  auto out = at::empty({B, H, L, D}, k.options());
  if (out.numel() == 0) return out;
  const int rd = static_cast<int>(2 * inv.size(0));
  const auto stream = at::cuda::getCurrentCUDAStream();
  TORCH_CHECK(B * L <= INT32_MAX, "rotate_keys (cuda): B * L too large");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "rotate_keys_cuda", [&] {
    rotate_keys_kernel<scalar_t><<<static_cast<unsigned>(B * L), kRotThreads, 0, stream>>>(
        k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.stride(2), dl.data_ptr<int64_t>(), inv.data_ptr<float>(),
        rd, neox, out.data_ptr<scalar_t>(), static_cast<int>(H), L, static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace pskernels
