// Framework-free math shared by the CPU and CUDA kernels: RoPE rotation by a position delta,
// soft-capping, and online-softmax / log-sum-exp state merging. No ATen, no CUDA runtime.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define PSK_HD __host__ __device__ __forceinline__
#else
#define PSK_HD inline
#endif

namespace pskernels {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rotate `x[0:rotary_dim]` in place by angle `pos * inv_freq[i]` (HF "neox" half-split when `neox`,
// else interleaved "gptj" pairs). Dimensions past rotary_dim are untouched.
PSK_HD void rope_rotate(float* x, int rotary_dim, bool neox, const float* inv_freq, float pos) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float ang = pos * inv_freq[i];
    const float c = cosf(ang), s = sinf(ang);
    const int a = neox ? i : 2 * i;
    const int b = neox ? i + half : 2 * i + 1;
    const float x1 = x[a], x2 = x[b];
    x[a] = x1 * c - x2 * s;
    x[b] = x2 * c + x1 * s;
  }
}

PSK_HD float soft_cap(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

// Running softmax state of one query row over a set of keys: max score m, normaliser l; the caller
// keeps the un-normalised accumulator acc = sum_j exp(s_j - m) v_j.
struct SoftmaxState {
  float m;
  float l;
};

PSK_HD SoftmaxState empty_state() { return {kNegInf, 0.f}; }

// Rescale factor for the old accumulator when the running max moves from m_old to m_new.
PSK_HD float rescale(float m_old, float m_new) {
  return m_old == kNegInf ? 0.f : expf(m_old - m_new);
}

// Natural-log LSE of a state; -inf for an empty one.
PSK_HD float state_lse(SoftmaxState st) { return st.l <= 0.f ? kNegInf : st.m + logf(st.l); }  // NaN stays NaN

// Merge state `b` (with accumulator weight) into `a`: returns the factors (fa, fb) by which the two
// accumulators are multiplied before adding. Empty states (m = -inf) contribute nothing, never NaN.
PSK_HD void merge_factors(SoftmaxState& a, SoftmaxState b, float& fa, float& fb) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == kNegInf) {
    fa = 0.f;
    fb = 0.f;
    return;
  }
  fa = a.m == kNegInf ? 0.f : expf(a.m - m);
  fb = b.m == kNegInf ? 0.f : expf(b.m - m);
  a.l = a.l * fa + b.l * fb;
  a.m = m;
}

}  // namespace pskernels
