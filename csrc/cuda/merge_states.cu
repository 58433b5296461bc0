// CUDA merge_states (same contract as csrc/cpu/merge_states.cpp): one warp per output row, lanes over Dv.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../merge_states_checks.h"
#include "../ops.h"
#include "device_helpers.cuh"

namespace pskernels {
namespace cuda {
namespace {

constexpr int kMergeWarps = 4;

template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps)
    merge_states_kernel(const T* __restrict__ outs, const float* __restrict__ lses, T* __restrict__ out,
                        float* __restrict__ lse, int64_t N, int64_t rows, int64_t Dv) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (r >= rows) return;
  // Same result as folding merge_factors over the N states (each with l = 1): M = max lse, l = sum e^(lse - M).
  float M = kNegInf;
  bool nan = false;
  for (int64_t n = lane; n < N; n += 32) {
    const float s = lses[n * rows + r];
    M = fmaxf(M, s);
    nan |= s != s;
  }
  M = warp_max(M);
  if (__any_sync(0xffffffffu, nan)) M = __int_as_float(0x7fc00000);  // fmaxf drops NaN; the result must be NaN
  float l = 0.f;
  if (M != kNegInf)
    for (int64_t n = lane; n < N; n += 32) {
      const float s = lses[n * rows + r];
      l += s == kNegInf ? 0.f : __expf(s - M);
    }
  l = warp_sum(l);
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t d = lane; d < Dv; d += 32) {
    float acc = 0.f;
    if (M != kNegInf)
      for (int64_t n = 0; n < N; ++n) {
        const float s = lses[n * rows + r];
        if (s != kNegInf) acc += __expf(s - M) * to_f(outs[(n * rows + r) * Dv + d]);
      }
    out[r * Dv + d] = static_cast<T>(acc * inv);
  }
  if (lane == 0) lse[r] = state_lse(SoftmaxState{M, l});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_states(const at::Tensor& outs, const at::Tensor& lses) {
  check_merge_states_args(outs, lses);
  TORCH_CHECK(outs.is_cuda() && lses.device() == outs.device(), "merge_states (cuda): expected CUDA tensors on one device");
  const c10::cuda::CUDAGuard guard(outs.device());
  auto o = outs.contiguous();
  auto s = lses.contiguous();
  const int64_t N = o.size(0), rows = o.size(1) * o.size(2) * o.size(3), Dv = o.size(4);
  auto out = at::empty(o.sizes().slice(1), o.options());
  auto lse = at::empty(s.sizes().slice(1), s.options());
  if (rows == 0) return {out, lse};
  const auto blocks = static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "merge_states_cuda", [&] {
    merge_states_kernel<scalar_t><<<blocks, 32 * kMergeWarps, 0, stream>>>(
        o.data_ptr<scalar_t>(), s.data_ptr<float>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), N, rows, Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

}  // namespace cuda
}  // namespace pskernels
