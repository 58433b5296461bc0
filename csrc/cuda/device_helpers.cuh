// Device helpers shared by the CUDA kernels of several ops (header only): float conversion of an element,
// RoPE from a per-position cos/sin table (rope_cs / rope_elem) or per element (rope_elem_at), warp-wide max, sum,
// and int min / max.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pskernels/math.h"

namespace pskernels {
namespace cuda {

constexpr int kMaxRotaryHalf = 128;  // rotary_dim <= head_dim <= 256

template <typename T>
__device__ __forceinline__ float to_f(T x) {
  return static_cast<float>(x);
}

// cos/sin of the float angle `pos * inv_freq[i]` exactly as the CPU's rope_rotate forms it, evaluated in
// double: setup.py compiles with --use_fast_math, which would turn cosf/sinf into the approximate MUFU
// instructions whose error grows with |angle| (positions reach 1e4..1e6).
__device__ __forceinline__ float2 rope_cs(float pos, float inv_freq) {
  const float ang = pos * inv_freq;
  double s, c;
  sincos(static_cast<double>(ang), &s, &c);
  return make_float2(static_cast<float>(c), static_cast<float>(s));
}

// Element d of rope_rotate(x, rd, neox, ., pos), with cs_of(i) the (cos, sin) of pair i's angle pos*inv_freq[i]:
// the same formulas as pskernels::rope_rotate (x[a] = x1 c - x2 s, x[b] = x2 c + x1 s).
template <typename P, typename CsOf>
__device__ __forceinline__ float rope_pair_elem(const P* x, int d, int rd, bool neox, CsOf cs_of) {
  if (d >= rd) return to_f(x[d]);
  const int half = rd >> 1;
  int i, a, b;
  if (neox) {
    i = d < half ? d : d - half;
    a = i;
    b = i + half;
  } else {
    i = d >> 1;
    a = 2 * i;
    b = a + 1;
  }
  const float x1 = to_f(x[a]), x2 = to_f(x[b]);
  const float2 t = cs_of(i);
  return d == a ? x1 * t.x - x2 * t.y : x2 * t.x + x1 * t.y;
}

// The pair's (cos, sin) read from a per-position table cs[i] (one position for the whole tile).
template <typename P>
__device__ __forceinline__ float rope_elem(const P* x, int d, int rd, bool neox, const float2* cs) {
  return rope_pair_elem(x, d, rd, neox, [cs](int i) { return cs[i]; });
}

// The pair's (cos, sin) = rope_cs(pos, inv_freq[i]) computed here: for tiles whose rows rotate by different
// positions (the cascade's stacked rows, each by its own batch row's shift). The same float angle as the table,
// so both give the same bits.
template <typename P>
__device__ __forceinline__ float rope_elem_at(const P* x, int d, int rd, bool neox, const float* inv_freq, float pos) {
  return rope_pair_elem(x, d, rd, neox, [inv_freq, pos](int i) { return rope_cs(pos, inv_freq[i]); });
}

// Butterfly all-reduce over the 32 lanes of a warp: every lane gets op over all of them.
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V x, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  return warp_allreduce(x, [](float u, float v) { return fmaxf(u, v); });
}

__device__ __forceinline__ float warp_sum(float x) {
  return warp_allreduce(x, [](float u, float v) { return u + v; });
}

__device__ __forceinline__ int warp_min_int(int x) {
  return warp_allreduce(x, [](int u, int v) { return min(u, v); });
}

__device__ __forceinline__ int warp_max_int(int x) {
  return warp_allreduce(x, [](int u, int v) { return max(u, v); });
}

}  // namespace cuda
}  // namespace pskernels
