// CPU merge_states: log-sum-exp merge of N partial attention states, rows split across threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../merge_states_checks.h"
#include "../ops.h"
#include "pskernels/math.h"

namespace pskernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> merge_states(const at::Tensor& outs, const at::Tensor& lses) {
  check_merge_states_args(outs, lses);
  TORCH_CHECK(outs.device().is_cpu() && lses.device().is_cpu(), "merge_states (cpu): expected CPU tensors");
  auto o = outs.contiguous();
  auto s = lses.contiguous();
  const int64_t N = o.size(0), rows = o.size(1) * o.size(2) * o.size(3), Dv = o.size(4);
  auto out = at::empty(o.sizes().slice(1), o.options());
  auto lse = at::empty(s.sizes().slice(1), s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "merge_states_cpu", [&] {
    const scalar_t* op = o.data_ptr<scalar_t>();
    const float* sp = s.data_ptr<float>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    float* dl = lse.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(Dv);
      for (int64_t r = begin; r < end; ++r) {
        SoftmaxState st = empty_state();
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t n = 0; n < N; ++n) {
          float fa, fb;
          merge_factors(st, SoftmaxState{sp[n * rows + r], 1.f}, fa, fb);
          const scalar_t* src = op + (n * rows + r) * Dv;
          for (int64_t d = 0; d < Dv; ++d) acc[d] = acc[d] * fa + static_cast<float>(src[d]) * fb;
        }
        const float inv = st.l > 0.f ? 1.f / st.l : 0.f;
        for (int64_t d = 0; d < Dv; ++d) dst[r * Dv + d] = static_cast<scalar_t>(acc[d] * inv);
        dl[r] = state_lse(st);
      }
    });
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace pskernels
