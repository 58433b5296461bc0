// CPU rotate_keys: RoPE rotation of cached keys by a per-token position delta, rows split across threads.
#include <ATen/Parallel.h>

#include <vector>

#include "../ops.h"
#include "../rotate_keys_checks.h"
#include "pskernels/math.h"

namespace pskernels {
namespace cpu {

at::Tensor rotate_keys(const at::Tensor& k, const at::Tensor& delta, const at::Tensor& inv_freq, bool neox) {
  check_rotate_keys_args(k, delta, inv_freq);
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  TORCH_CHECK(k.device().is_cpu(), "rotate_keys (cpu): expected CPU tensors");
  auto dl = delta.contiguous();
  auto inv = inv_freq.contiguous();
  auto out = at::empty({B, H, L, D}, k.options());
  const int rd = static_cast<int>(2 * inv.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "rotate_keys_cpu", [&] {
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* dp = dl.data_ptr<int64_t>();
    const float* fp = inv.data_ptr<float>();
    at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> x(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t l = r % L, h = (r / L) % H, b = r / L / H;
        const scalar_t* src = kp + b * k.stride(0) + h * k.stride(1) + l * k.stride(2);
        for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(src[d]);
        rope_rotate(x.data(), rd, neox, fp, static_cast<float>(dp[b * L + l]));
        for (int64_t d = 0; d < D; ++d) op[r * D + d] = static_cast<scalar_t>(x[d]);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace pskernels
