// CUDA multi-branch attention (same contract and argument order as csrc/cpu/multi_branch_attention.cpp).
//
// Phase 1 (mba_kernel): one block per (row tile, key split) x kv head x batch row. A row tile holds up to 16
// query rows ordered (query position, q head of this kv head), so every K/V element a block stages in shared
// memory serves all G query heads of its kv head. Keys are visited where they are stored, segment after
// segment (no concatenation); the query tile is re-rotated by -shift whenever a segment's shift changes.
// Each warp owns 4 rows; lane j scores key j of a 32-key block, the online-softmax state (m, l) of a row is
// kept per (row, calibration group) in fp32 and the accumulator is spread over the lanes (Dv / 32 per lane).
// Split-KV partitions the row's valid keys, flattened over segments, exactly like the CPU kernel. Partial
// states go to a float32 workspace; when there is one split and one group the kernel writes the output.
// Cascade (mba_kernel<T, true>): segments broadcast over the batch (batch stride 0: a shared prefix expanded to
// the B rows) are left to a second launch of the same kernel whose row tiles stack the rows of all batch rows of a
// kv head, so each K/V block of such a segment is staged once for up to 16 rows of several batch rows; its partial
// states take their own splits of the same workspace.
// Phase 2 (mba_merge_kernel): one warp per output row merges the splits of each group (both passes'), applies the
// calibration knobs and merges the groups by log-sum-exp (the CPU kernel's merge phase).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/record_function.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

// torch/extension.h (via multi_branch_attention_checks.h) triggers nvcc's C++20 "module" diagnostic in torch's
// own headers.
#pragma nv_diag_suppress 3189
#include "../multi_branch_attention_checks.h"
#pragma nv_diag_default 3189
#include "../ops.h"
#include "device_helpers.cuh"

namespace pskernels {
namespace cuda {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kMaxWarps = 4;
constexpr int kThreads = 32 * kMaxWarps;
constexpr int kKeys = 32;        // keys per shared-memory block: one per lane
constexpr int kMaxChunks = 8;    // Dv <= 256: Dv / 32 accumulator chunks per lane
constexpr int kMaxHeadDim = 256;
constexpr int kSegFields = 12;   // per-segment table entry (int64), see the launcher
constexpr int kMergeWarps = 4;
constexpr int kLoadBatch = 2;  // loads in flight per thread while staging K/V (4 spills at the 168-register target)

struct AttnParams {
  const void* q;
  int64_t sqb, sqh, sql;
  const int64_t* segtab;  // [S, kSegFields], then seq_lens and left_pad (see the launcher)
  const int64_t* seq_lens;
  const int64_t* left_pad;
  const int64_t* shifts;   // or null
  const int64_t* seg_pos;  // or null
  const int64_t* q_pos;    // or null
  const float* inv_freq;   // or null
  const float* temperature;
  const float* lse_scale;
  const float* log_weight;
  float* ws_ml;   // [B, Hkv, R, ws_split, Gc] x (m, l)
  float* ws_acc;  // [B, Hkv, R, ws_split, Gc, Dv]
  void* out;      // [B, Hq, Lq, Dv] contiguous
  float* lse;     // [B, Hq, Lq]
  int64_t window;
  float scale, softcap;
  int S, B, Hq, Hkv, G, Lq, D, Dv, R, rd;
  int n_tiles, n_split, Gc;
  int ws_split;   // splits per row in the workspace: the per-row pass's n_split, then the cascade's
  int split_off;  // this pass's first workspace split (0 for the per-row pass, its n_split for the cascade)
  int cw;  // warps that own query rows (the block always has kMaxWarps warps: all of them stage K/V)
  bool neox, causal_last, knobs, direct;
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// c * tanh(x / c) (pskernels::soft_cap) with an accurate tanh: under --use_fast_math tanhf becomes
// tanh.approx.f32 (about 2^-11 relative error).
__device__ __forceinline__ float soft_cap_accurate(float x, float cap) {
  if (!(cap > 0.f)) return x;
  const float y = x / cap;
  const float a = fabsf(y);
  float t = 1.f;
  if (a < 9.f) {
    const float e = expm1f(2.f * a);
    t = e / (e + 2.f);
  }
  return cap * copysignf(t, y);
}

// Unpack one 16-byte vector of T into floats with register bit operations (taking the address of a register
// array would put it in local memory).
__device__ __forceinline__ float f32_bits(uint32_t w) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(w);
#else
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#endif
}
__device__ __forceinline__ float f64_bits(uint32_t lo, uint32_t hi) {
#ifdef __CUDA_ARCH__
  return static_cast<float>(__hiloint2double(static_cast<int>(hi), static_cast<int>(lo)));
#else
  const uint64_t w = (static_cast<uint64_t>(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &w, sizeof d);
  return static_cast<float>(d);
#endif
}
__device__ __forceinline__ void unpack16(const uint4& u, float* o, float) {
  o[0] = f32_bits(u.x);
  o[1] = f32_bits(u.y);
  o[2] = f32_bits(u.z);
  o[3] = f32_bits(u.w);
}
__device__ __forceinline__ void unpack16(const uint4& u, float* o, double) {
  o[0] = f64_bits(u.x, u.y);
  o[1] = f64_bits(u.z, u.w);
}
__device__ __forceinline__ void unpack16(const uint4& u, float* o, c10::BFloat16) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = f32_bits(w[i] << 16);
    o[2 * i + 1] = f32_bits(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack16(const uint4& u, float* o, c10::Half) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = static_cast<float>(c10::Half(static_cast<uint16_t>(w[i] & 0xffffu), c10::Half::from_bits()));
    o[2 * i + 1] = static_cast<float>(c10::Half(static_cast<uint16_t>(w[i] >> 16), c10::Half::from_bits()));
  }
}

// Stage `rows` rows of `width` elements (row stride `row_stride`) as float32; `vec`: 16-byte loads (the caller
// checked alignment). Loads are issued kLoadBatch at a time before they are converted, for memory parallelism.
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int dst_stride, const T* src, int64_t row_stride, int rows,
                                          int width, bool vec, int tid, int nthreads) {
  constexpr int VW = 16 / static_cast<int>(sizeof(T));
  if (vec) {
    const int nv = width / VW, total = rows * nv;
    for (int base = tid; base < total; base += kLoadBatch * nthreads) {
      uint4 u[kLoadBatch];
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int idx = base + k * nthreads;
        if (idx < total) {
          const int r = idx / nv, c = idx - r * nv;
          u[k] = __ldg(reinterpret_cast<const uint4*>(src + r * row_stride + c * VW));
        }
      }
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int idx = base + k * nthreads;
        if (idx < total) {
          const int r = idx / nv, c = idx - r * nv;
          unpack16(u[k], dst + r * dst_stride + c * VW, T());
        }
      }
    }
  } else {
    const int total = rows * width;
    for (int base = tid; base < total; base += kLoadBatch * nthreads) {
      float u[kLoadBatch];
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int idx = base + k * nthreads;
        if (idx < total) {
          const int r = idx / width, c = idx - r * width;
          u[k] = to_f(src[r * row_stride + c]);
        }
      }
#pragma unroll
      for (int k = 0; k < kLoadBatch; ++k) {
        const int idx = base + k * nthreads;
        if (idx < total) {
          const int r = idx / width, c = idx - r * width;
          dst[r * dst_stride + c] = u[k];
        }
      }
    }
  }
}

// Union over the batch rows of the valid slots [pad, len) of shared segment s (of L slots); (L, L) when no row has
// any. Lanes stride over the rows, so every warp of every cascade block gets the same union (and split ranges).
__device__ __forceinline__ int2 shared_union(const AttnParams& p, int s, int L, int lane) {
  int lo = L, hi = 0;
  for (int bb = lane; bb < p.B; bb += 32) {
    const int64_t o = static_cast<int64_t>(s) * p.B + bb;
    const int64_t len = p.seq_lens[o], pad = p.left_pad[o];
    if (len > pad) {  // len <= L <= INT32_MAX (the launcher's condition for a shared segment)
      lo = min(lo, static_cast<int>(pad));
      hi = max(hi, static_cast<int>(len));
    }
  }
  lo = warp_min_int(lo);
  hi = warp_max_int(hi);
  return make_int2(lo, max(hi, lo));
}

// kCascade = false: the per-row pass over the segments of each batch row (segment table flag 0), grid
// (n_tiles * n_split, Hkv, B). kCascade = true: the cascade pass over the segments shared by all batch rows (flag 1),
// grid (n_tiles * n_split, Hkv, 1); its tiles cover the M = B * R stacked rows (batch row, query position, q head)
// of a kv head, so every staged K/V block serves up to 16 rows of several batch rows. Each stacked row keeps its
// batch row's metadata: its visible slots [rlo, rhi) of the segment fold lengths, left pad, causal bound and
// window, and its query is rotated by its batch row's -shift. The cascade always writes workspace slots (splits
// split_off.. of its rows), merged with the per-row pass's by mba_merge_kernel.
template <typename T, bool kCascade>
__global__ void __launch_bounds__(kThreads) mba_kernel(const AttnParams p) {
  extern __shared__ float4 smem4[];
  const int nwarps = p.cw;
  const int BM = nwarps * kRowsPerWarp;
  const int D = p.D, Dv = p.Dv;
  float4* qs = smem4;  // [nwarps][D] float4: the 4 rows of a warp interleaved
  float* ks = reinterpret_cast<float*>(smem4 + nwarps * D);  // [kKeys][D + 1] (padded: conflict-free)
  float* vs = ks + kKeys * (D + 1);                           // [kKeys][Dv]
  float2* cs = reinterpret_cast<float2*>(vs + kKeys * Dv);    // [rd / 2]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x / p.n_split, split = blockIdx.x - tile * p.n_split;
  const int hkv = blockIdx.y, b = blockIdx.z;  // b = 0 in the cascade (its rows carry their own batch rows)
  const int G = p.G, Lq = p.Lq, R = p.R, B = p.B;
  const int M = kCascade ? B * R : R;  // rows the tiles cover (B * R <= INT32_MAX: checked by the launcher)
  const int r0 = tile * BM;
  const int nrows = min(BM, M - r0);
  const int nc = (Dv + 31) >> 5;

  int row_i[kRowsPerWarp], row_hq[kRowsPerWarp];
  int64_t row_qpos[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
#pragma unroll
  for (int ri = 0; ri < kRowsPerWarp; ++ri) {
    const int row = r0 + warp * kRowsPerWarp + ri;
    row_ok[ri] = row < r0 + nrows;  // (warps past the row-owning ones own none)
    int rr = row_ok[ri] ? row : r0;
    if constexpr (kCascade) rr -= (rr / R) * R;  // the row within its batch row
    row_i[ri] = rr / G;
    row_hq[ri] = hkv * G + (rr - row_i[ri] * G);
    row_qpos[ri] = (!kCascade && p.window > 0) ? p.q_pos[static_cast<int64_t>(b) * Lq + row_i[ri]] : 0;
  }
  const bool warp_active = warp * kRowsPerWarp < nrows;
  int i_hi = 0;
  int64_t qpos_min = 0;
  if constexpr (!kCascade) {
    const int i_lo = r0 / G;
    i_hi = (r0 + nrows - 1) / G;
    if (p.window > 0) {
      qpos_min = p.q_pos[static_cast<int64_t>(b) * Lq + i_lo];
      for (int i = i_lo + 1; i <= i_hi; ++i) qpos_min = min64(qpos_min, p.q_pos[static_cast<int64_t>(b) * Lq + i]);
    }
  }

  // The keys this pass reads, flattened over its segments, decide the split's range (as on the CPU): the row's
  // valid keys in the per-row pass, the union over batch rows of each shared segment's valid slots in the cascade.
  int64_t total = 0;
  for (int s = 0; s < p.S; ++s) {
    const int64_t* e = p.segtab + static_cast<int64_t>(s) * kSegFields;
    if ((e[11] != 0) != kCascade) continue;
    if constexpr (kCascade) {
      const int2 u = shared_union(p, s, static_cast<int>(e[8]), lane);
      total += u.y - u.x;
    } else {
      const int64_t o = static_cast<int64_t>(s) * B + b;
      total += max64(0, p.seq_lens[o] - p.left_pad[o]);
    }
  }
  const int64_t per = (total + p.n_split - 1) / p.n_split;
  const int64_t lo = split * per, hi = min64(total, lo + per);

  float m[kRowsPerWarp], l[kRowsPerWarp], inv_t[kRowsPerWarp];
  float acc[kRowsPerWarp][kMaxChunks];
#pragma unroll
  for (int ri = 0; ri < kRowsPerWarp; ++ri) {
    m[ri] = kNegInf;
    l[ri] = 0.f;
    inv_t[ri] = 1.f;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) acc[ri][c] = 0.f;
  }
  int rlo[kRowsPerWarp], rhi[kRowsPerWarp];  // cascade: each row's visible slots [rlo, rhi) of the current segment

  // Workspace slot of (row, group) for this split.
  auto slot = [&](int ri, int g) -> int64_t {
    int64_t row = r0 + warp * kRowsPerWarp + ri, bb = b;
    if constexpr (kCascade) {
      bb = row / R;
      row -= bb * R;
    }
    return (((bb * p.Hkv + hkv) * R + row) * p.ws_split + p.split_off + split) * p.Gc + g;
  };
  // With several groups, slots start empty and a group's state is merged in when the group changes.
  const bool multi = p.Gc > 1;
  if (multi && warp_active) {
    for (int x = lane; x < kRowsPerWarp * p.Gc; x += 32) {
      const int ri = x / p.Gc, g = x - ri * p.Gc;
      if (r0 + warp * kRowsPerWarp + ri < M) p.ws_ml[2 * slot(ri, g)] = kNegInf;
    }
    __syncwarp();
  }
  auto flush = [&](int g) {
#pragma unroll
    for (int ri = 0; ri < kRowsPerWarp; ++ri) {
      if (!row_ok[ri]) continue;
      const int64_t sl = slot(ri, g);
      float* ml = p.ws_ml + 2 * sl;
      float* a = p.ws_acc + sl * Dv;
      float fa = 0.f, fb = 1.f;
      SoftmaxState st{m[ri], l[ri]};
      if (multi) {
        if (m[ri] == kNegInf) continue;
        const float om = ml[0];
        if (om != kNegInf) {
          st = SoftmaxState{om, ml[1]};
          merge_factors(st, SoftmaxState{m[ri], l[ri]}, fa, fb);
        }
      }
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int d = lane + 32 * c;
        if (c < nc && d < Dv) a[d] = (fa != 0.f ? a[d] * fa : 0.f) + acc[ri][c] * fb;
      }
      __syncwarp();
      if (lane == 0) {
        ml[0] = st.m;
        ml[1] = st.l;
      }
      __syncwarp();
    }
  };

  const T* q = static_cast<const T*>(p.q);
  int cur_g = -1;
  int64_t cur_shift = 0;
  bool q_loaded = false;
  int64_t flat = 0;  // flattened index of the current segment's first key of the partition
  for (int s = 0; s < p.S; ++s) {
    const int64_t* e = p.segtab + static_cast<int64_t>(s) * kSegFields;
    if ((e[11] != 0) != kCascade) continue;
    const int64_t o = static_cast<int64_t>(s) * B + b;
    const bool causal = p.causal_last && s == p.S - 1;
    int64_t j0, j1, len = 0, seg_pos = 0;
    if constexpr (kCascade) {
      const int2 u = shared_union(p, s, static_cast<int>(e[8]), lane);
      const int64_t n = u.y - u.x;
      const int64_t a0 = max64(lo, flat), e0 = min64(hi, flat + n);
      j0 = u.x + (a0 - flat);
      j1 = u.x + (e0 - flat);
      flat += n;
      if (j0 >= j1) continue;
      // Lane x < nrows: the visible slots of tile row r0 + x within [j0, j1); empty is (INT_MAX, INT_MIN). Every
      // warp reduces the same values, so all of them visit the tile's union of keys.
      int vlo = INT_MAX, vhi = INT_MIN;
      if (lane < nrows) {
        const int mrow = r0 + lane, bb = mrow / R, ii = (mrow - bb * R) / G;
        const int64_t ob = static_cast<int64_t>(s) * B + bb;
        const int64_t rlen = p.seq_lens[ob];
        int64_t x0 = max64(j0, p.left_pad[ob]), x1 = min64(j1, rlen);
        if (causal) x1 = min64(x1, rlen - Lq + ii + 1);  // bottom-right: query ii sees slots <= len - Lq + ii
        if (p.window > 0)
          x0 = max64(x0, p.q_pos[static_cast<int64_t>(bb) * Lq + ii] - p.seg_pos[ob] - p.window + 1);
        if (x0 < x1) {  // inside [j0, j1) of a segment of <= INT32_MAX slots
          vlo = static_cast<int>(x0);
          vhi = static_cast<int>(x1);
        }
      }
#pragma unroll
      for (int ri = 0; ri < kRowsPerWarp; ++ri) {
        rlo[ri] = __shfl_sync(0xffffffffu, vlo, warp * kRowsPerWarp + ri);
        rhi[ri] = __shfl_sync(0xffffffffu, vhi, warp * kRowsPerWarp + ri);
      }
      const int tlo = warp_min_int(vlo), thi = warp_max_int(vhi);
      if (tlo >= thi) continue;  // no row of the tile sees a key of this split
      j0 = tlo;
      j1 = thi;
    } else {
      len = p.seq_lens[o];
      const int64_t pad = p.left_pad[o];
      const int64_t nvalid = max64(0, len - pad);
      const int64_t a0 = max64(lo, flat), e0 = min64(hi, flat + nvalid);
      j0 = pad + (a0 - flat);
      j1 = pad + (e0 - flat);
      flat += nvalid;
      if (j0 >= j1) continue;
      if (causal) j1 = min64(j1, len - Lq + i_hi + 1);  // keys past every row's causal limit
      seg_pos = p.window > 0 ? p.seg_pos[o] : 0;
      if (p.window > 0) j0 = max64(j0, qpos_min - seg_pos - p.window + 1);  // keys outside every row's window
      if (j0 >= j1) continue;
    }

    const T* kp = reinterpret_cast<const T*>(e[0]) + b * e[2] + hkv * e[3];
    const T* vp = reinterpret_cast<const T*>(e[1]) + b * e[5] + hkv * e[6];
    const int64_t skl = e[4], svl = e[7];
    const bool veck = (e[9] & 1) != 0, vecv = (e[9] & 2) != 0;

    const int g = p.knobs ? static_cast<int>(e[10]) : 0;
    if (g != cur_g) {
      if (cur_g >= 0 && warp_active) flush(cur_g);
#pragma unroll
      for (int ri = 0; ri < kRowsPerWarp; ++ri) {
        m[ri] = kNegInf;
        l[ri] = 0.f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) acc[ri][c] = 0.f;
        inv_t[ri] = p.temperature ? 1.f / p.temperature[static_cast<int64_t>(g) * p.Hq + row_hq[ri]] : 1.f;
      }
      cur_g = g;
    }

    // The query tile rotated by -shift. Per-row pass: one shift for the whole tile, reloaded when it changes. The
    // cascade: each stacked row by its batch row's shift (reloaded for every shared segment when shifts exist).
    int64_t shift = 0;
    bool reload = !q_loaded;
    if constexpr (kCascade) {
      reload = reload || p.shifts != nullptr;
    } else {
      shift = p.shifts ? p.shifts[o] : 0;
      reload = reload || shift != cur_shift;
    }
    if (reload) {
      __syncthreads();  // every warp is done with the previous query tile
      bool rot = false;
      if constexpr (!kCascade) {
        rot = shift != 0 && p.rd > 0;
        if (rot)
          for (int t = tid; t < (p.rd >> 1); t += blockDim.x) cs[t] = rope_cs(-static_cast<float>(shift), p.inv_freq[t]);
        __syncthreads();
      }
      for (int idx = tid; idx < BM * D; idx += blockDim.x) {
        const int r = idx / D, d = idx - r * D;
        const int row = r0 + r;
        float x = 0.f;
        if (row < M) {
          int bb = b, rr = row;
          if constexpr (kCascade) {
            bb = row / R;
            rr = row - bb * R;
          }
          const int i = rr / G, hq = hkv * G + (rr - i * G);
          const T* qr = q + bb * p.sqb + hq * p.sqh + i * p.sql;
          if constexpr (kCascade) {
            const int64_t sh = p.shifts ? p.shifts[static_cast<int64_t>(s) * B + bb] : 0;
            x = (sh != 0 && p.rd > 0) ? rope_elem_at(qr, d, p.rd, p.neox, p.inv_freq, -static_cast<float>(sh))
                                      : to_f(qr[d]);
          } else {
            x = rot ? rope_elem(qr, d, p.rd, p.neox, cs) : to_f(qr[d]);
          }
        }
        reinterpret_cast<float*>(qs + (r >> 2) * D + d)[r & 3] = x;
      }
      cur_shift = shift;
      q_loaded = true;
    }

    for (int64_t jb = j0; jb < j1; jb += kKeys) {
      const int nb = static_cast<int>(min64(kKeys, j1 - jb));
      __syncthreads();  // previous key block consumed (and the query tile written)
      load_rows<T>(ks, D + 1, kp + jb * skl, skl, nb, D, veck, tid, blockDim.x);
      load_rows<T>(vs, Dv, vp + jb * svl, svl, nb, Dv, vecv, tid, blockDim.x);
      __syncthreads();
      if (!warp_active) continue;

      float sc[kRowsPerWarp];
#pragma unroll
      for (int ri = 0; ri < kRowsPerWarp; ++ri) sc[ri] = kNegInf;
      if (lane < nb) {
        const float* kr = ks + lane * (D + 1);
        const float4* qw = qs + warp * D;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma unroll 4
        for (int d = 0; d < D; ++d) {
          const float kv = kr[d];
          const float4 qv = qw[d];
          d0 = fmaf(qv.x, kv, d0);
          d1 = fmaf(qv.y, kv, d1);
          d2 = fmaf(qv.z, kv, d2);
          d3 = fmaf(qv.w, kv, d3);
        }
        const float dots[kRowsPerWarp] = {d0, d1, d2, d3};
        const int64_t j = jb + lane;
#pragma unroll
        for (int ri = 0; ri < kRowsPerWarp; ++ri) {
          float x = soft_cap_accurate(dots[ri] * p.scale, p.softcap) * inv_t[ri];
          // NaN (NaN/Inf in q or k) -> +inf: the row max becomes +inf and exp(inf - inf) = NaN poisons l and acc;
          // fmaxf would skip a NaN and the row could end up empty or finite
          if (x != x) x = INFINITY;
          if (!row_ok[ri]) x = kNegInf;
          if constexpr (kCascade) {
            if (j < rlo[ri] || j >= rhi[ri]) x = kNegInf;
          } else {
            if (causal && j > len - Lq + row_i[ri]) x = kNegInf;
            if (p.window > 0 && row_qpos[ri] - (seg_pos + j) >= p.window) x = kNegInf;
          }
          sc[ri] = x;
        }
      }
      // Online-softmax update per row (warp-uniform control flow).
#pragma unroll
      for (int ri = 0; ri < kRowsPerWarp; ++ri) {
        const float mb = warp_max(sc[ri]);
        if (mb == kNegInf) {
          sc[ri] = 0.f;
          continue;
        }
        const float mn = fmaxf(m[ri], mb);
        const float f = rescale(m[ri], mn);
        const float pr = sc[ri] == kNegInf ? 0.f : __expf(sc[ri] - mn);
        l[ri] = l[ri] * f + warp_sum(pr);
        m[ri] = mn;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) acc[ri][c] *= f;
        sc[ri] = pr;
      }
      for (int jj = 0; jj < nb; ++jj) {
        float pj[kRowsPerWarp];
#pragma unroll
        for (int ri = 0; ri < kRowsPerWarp; ++ri) pj[ri] = __shfl_sync(0xffffffffu, sc[ri], jj);
        const float* vr = vs + jj * Dv;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int d = lane + 32 * c;
          if (c < nc) {
            const float v = d < Dv ? vr[d] : 0.f;
#pragma unroll
            for (int ri = 0; ri < kRowsPerWarp; ++ri) acc[ri][c] = fmaf(pj[ri], v, acc[ri][c]);
          }
        }
      }
    }
  }

  if (!warp_active) return;
  if (kCascade || !p.direct) {
    if (cur_g >= 0 || !multi) flush(cur_g >= 0 ? cur_g : 0);
    return;
  }
  // One split and one group: this block holds the final state of its rows.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int ri = 0; ri < kRowsPerWarp; ++ri) {
    if (!row_ok[ri]) continue;
    const int hq = row_hq[ri], i = row_i[ri];
    const int64_t orow = (static_cast<int64_t>(b) * p.Hq + hq) * Lq + i;
    float lg = state_lse(SoftmaxState{m[ri], l[ri]});
    const float inv_l = l[ri] > 0.f ? 1.f / l[ri] : 0.f;
    if (lg == kNegInf) {
      // empty row: output 0, lse -inf
    } else if (p.knobs) {
      if (p.temperature) lg *= p.temperature[hq];
      if (p.lse_scale) lg *= p.lse_scale[hq];
      if (p.log_weight) lg += p.log_weight[hq];
    }
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int d = lane + 32 * c;
      if (c < nc && d < Dv) out[orow * Dv + d] = static_cast<T>(lg == kNegInf ? 0.f : acc[ri][c] * inv_l);
    }
    if (lane == 0) p.lse[orow] = lg;
  }
}

// Merge splits within each group, calibrate groups, merge groups (one warp per output row).
template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps) mba_merge_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t orow = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  const int64_t nrows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (orow >= nrows) return;
  const int Dv = p.Dv, nc = (Dv + 31) >> 5;
  const int i = static_cast<int>(orow % p.Lq);
  const int hq = static_cast<int>((orow / p.Lq) % p.Hq);
  const int64_t b = orow / (static_cast<int64_t>(p.Lq) * p.Hq);
  const int hkv = hq / p.G, row = i * p.G + (hq - hkv * p.G);
  const int64_t base = ((b * p.Hkv + hkv) * p.R + row) * p.ws_split * p.Gc;

  float y[kMaxChunks], a[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) y[c] = 0.f;
  float M = kNegInf, wsum = 0.f;
  for (int g = 0; g < p.Gc; ++g) {
    SoftmaxState st = empty_state();
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) a[c] = 0.f;
    for (int sp = 0; sp < p.ws_split; ++sp) {
      const int64_t sl = base + static_cast<int64_t>(sp) * p.Gc + g;
      const float2 ml = *reinterpret_cast<const float2*>(p.ws_ml + 2 * sl);
      if (ml.x == kNegInf) continue;
      float fa, fb;
      merge_factors(st, SoftmaxState{ml.x, ml.y}, fa, fb);
      const float* src = p.ws_acc + sl * Dv;
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int d = lane + 32 * c;
        if (c < nc && d < Dv) a[c] = a[c] * fa + src[d] * fb;
      }
    }
    float lg = state_lse(st);
    if (lg == kNegInf) continue;
    if (p.knobs) {
      const int64_t k = static_cast<int64_t>(g) * p.Hq + hq;
      if (p.temperature) lg *= p.temperature[k];
      if (p.lse_scale) lg *= p.lse_scale[k];
      if (p.log_weight) lg += p.log_weight[k];
    }
    const float inv_l = 1.f / st.l;
    const float mn = lg != lg ? lg : fmaxf(M, lg);  // NaN must win (fmaxf drops it)
    const float fo = M == kNegInf ? 0.f : __expf(M - mn);
    const float fn = __expf(lg - mn);
    wsum = wsum * fo + fn;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) y[c] = y[c] * fo + fn * a[c] * inv_l;
    M = mn;
  }
  T* out = static_cast<T*>(p.out) + orow * Dv;
  const bool empty = M == kNegInf;
  const float inv_w = empty ? 0.f : 1.f / wsum;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int d = lane + 32 * c;
    if (c < nc && d < Dv) out[d] = static_cast<T>(empty ? 0.f : y[c] * inv_w);
  }
  if (lane == 0) p.lse[orow] = empty ? kNegInf : M + logf(wsum);
}

at::Tensor on_device(const c10::optional<at::Tensor>& t, const at::Device& dev) {
  return t.has_value() ? t->to(dev).contiguous() : at::Tensor();
}

// The cascade can be switched off per call (PSKERNELS_CUDA_CASCADE=0), for A/B measurements in one process.
bool cascade_enabled() {
  const char* env = std::getenv("PSKERNELS_CUDA_CASCADE");
  return env == nullptr || env[0] != '0';
}

// Dynamic shared memory of a block with BM query rows: query tile, K block (rows padded), V block, cos/sin table.
size_t smem_bytes(int64_t BM, int64_t D, int64_t Dv, int rd) {
  return sizeof(float) * static_cast<size_t>(BM * D + kKeys * (D + 1) + kKeys * Dv) +
         sizeof(float2) * static_cast<size_t>(rd / 2);
}

template <typename T, bool kCascade>
void launch_attention(const AttnParams& p, int64_t Hkv, int64_t grid_z, size_t smem, cudaStream_t stream) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(mba_kernel<T, kCascade>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.n_tiles) * static_cast<unsigned>(p.n_split), static_cast<unsigned>(Hkv),
                  static_cast<unsigned>(grid_z));
  mba_kernel<T, kCascade><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_branch_attention(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& seq_lens,
    const at::Tensor& left_pad, const c10::optional<at::Tensor>& shifts,
    const c10::optional<at::Tensor>& segment_positions, const c10::optional<at::Tensor>& query_positions,
    const c10::optional<at::Tensor>& inv_freq, bool rope_neox, bool causal_last, double scale, double softcap,
    int64_t window, const at::Tensor& groups, const c10::optional<at::Tensor>& temperature,
    const c10::optional<at::Tensor>& lse_scale, const c10::optional<at::Tensor>& log_weight) {
  const auto host = check_segments(q, keys, values, seq_lens, left_pad, shifts, segment_positions, query_positions,
                                   inv_freq, window, groups, temperature, lse_scale, log_weight);
  TORCH_CHECK(q.is_cuda(), "multi_branch_attention (cuda): q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t S = static_cast<int64_t>(keys.size());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = keys[0].size(1), Dv = values[0].size(3), G = Hq / Hkv;
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim && Dv >= 1 && Dv <= kMaxHeadDim,
              "multi_branch_attention (cuda): head dims must be in [1, 256], got D = ", D, ", Dv = ", Dv);
  auto out = at::empty({B, Hq, Lq, Dv}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const auto dev = q.device();

  const int64_t R = G * Lq;
  // Warps owning rows; the block always has kMaxWarps warps so that decode (few rows) still has 128 threads
  // staging K/V (more loads in flight).
  const int nwarps = static_cast<int>(std::min<int64_t>(kMaxWarps, (R + kRowsPerWarp - 1) / kRowsPerWarp));
  const int64_t BM = nwarps * kRowsPerWarp;
  const int64_t n_tiles = (R + BM - 1) / BM;

  // Cascade (docs/KERNELS.md §1.1, as in the CPU kernel): a segment broadcast over the batch (K and V with batch
  // stride 0, a shared prefix expanded to the B worker rows) is read by its own pass whose tiles stack the
  // M = B * R rows of all batch rows of a kv head, so each K/V block is staged once per tile of up to 16 stacked
  // rows instead of once per batch row's tile. Taken where it at least halves the passes over the segment
  // (ceil(M / BMc) <= B * n_tiles / 2): decode with G <= 4 and B > 1, G = 8 with even B, short prefills of small
  // G * Lq. Otherwise the per-row pass keeps the segment (its tiles are as full, and it skips each row's masked
  // keys). The cascade needs B * R and the segment's slot indices in int32; larger cases stay per-row.
  const int64_t M = B * R;
  const int cwarps = static_cast<int>(std::min<int64_t>(kMaxWarps, (M + kRowsPerWarp - 1) / kRowsPerWarp));
  const int64_t BMc = cwarps * kRowsPerWarp;
  const int64_t n_ctiles = (M + BMc - 1) / BMc;
  const bool stack = B > 1 && 2 * n_ctiles <= B * n_tiles && M <= INT32_MAX && cascade_enabled();

  // Per-segment table: k, v base pointers, strides, L, vector-load flags, calibration group, shared (cascade);
  // then seq_lens and left_pad [S, B]. Built on the host and sent with one non-blocking copy from pinned memory:
  // with the lengths passed on the host (as the Python adapter does), a call never waits for the device.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "multi_branch_attention (cuda): cannot run inside CUDA-graph capture: each call copies its segment "
              "table from host memory, which a replay would read again after it was freed; capture a plan of "
              "backend='triton' after its first run instead");
  const bool knobs = temperature.has_value() || lse_scale.has_value() || log_weight.has_value();
  auto grp = groups.to(at::kCPU).contiguous();
  const int64_t* gp = grp.data_ptr<int64_t>();
  int64_t Gc = 1;
  if (knobs)
    for (int64_t s = 0; s < S; ++s) Gc = std::max(Gc, gp[s] + 1);
  const int64_t vw = 16 / static_cast<int64_t>(q.element_size());
  auto tab = at::empty({S * kSegFields + 2 * S * B}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* tp = tab.data_ptr<int64_t>();
  int64_t own_len = 0, shared_len = 0, n_own = 0, n_shared = 0;
  for (int64_t s = 0; s < S; ++s) {
    const auto &k = keys[s], &v = values[s];
    int64_t* e = tp + s * kSegFields;
    e[0] = reinterpret_cast<int64_t>(k.data_ptr());
    e[1] = reinterpret_cast<int64_t>(v.data_ptr());
    e[2] = k.stride(0);
    e[3] = k.stride(1);
    e[4] = k.stride(2);
    e[5] = v.stride(0);
    e[6] = v.stride(1);
    e[7] = v.stride(2);
    e[8] = k.size(2);
    auto aligned = [&](const at::Tensor& t, int64_t width) {
      return width % vw == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % vw == 0 &&
             t.stride(1) % vw == 0 && t.stride(2) % vw == 0;
    };
    e[9] = (aligned(k, D) ? 1 : 0) | (aligned(v, Dv) ? 2 : 0);
    e[10] = gp[s];
    const bool shared = stack && k.stride(0) == 0 && v.stride(0) == 0 && k.size(2) > 0 && k.size(2) <= INT32_MAX;
    e[11] = shared ? 1 : 0;
    (shared ? shared_len : own_len) += k.size(2);
    (shared ? n_shared : n_own) += 1;
  }
  std::copy_n(host.lens.data_ptr<int64_t>(), S * B, tp + S * kSegFields);
  std::copy_n(host.pads.data_ptr<int64_t>(), S * B, tp + S * kSegFields + S * B);
  auto segtab = tab.to(at::TensorOptions().device(dev).dtype(at::kLong), /*non_blocking=*/true);

  at::Tensor sh = on_device(shifts, dev), sp = on_device(segment_positions, dev), qpos = on_device(query_positions, dev);
  at::Tensor inv = on_device(inv_freq, dev), tmp = on_device(temperature, dev), lsc = on_device(lse_scale, dev),
             lw = on_device(log_weight, dev);

  // Split-KV of each pass: about 4 blocks per SM. The per-row pass needs none when every segment is shared.
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t want = 4 * static_cast<int64_t>(props->multiProcessorCount);
  int64_t n_split = 0, n_csplit = 0;
  if (n_own > 0) {
    const int64_t items0 = B * Hkv * n_tiles;
    n_split = std::max<int64_t>(1, (want + items0 - 1) / items0);
    n_split = std::max<int64_t>(1, std::min<int64_t>({n_split, own_len / 256, 256}));
  }
  if (n_shared > 0) {
    // A cascade block scores up to 16 rows against each key: splits of fewer keys than the per-row pass's still
    // carry enough work for their partial states.
    const int64_t items0 = Hkv * n_ctiles;
    n_csplit = std::max<int64_t>(1, (want + items0 - 1) / items0);
    n_csplit = std::max<int64_t>(1, std::min<int64_t>({n_csplit, shared_len / 128, 256}));
  }
  const bool direct = n_shared == 0 && n_split == 1 && Gc == 1;
  TORCH_CHECK(n_tiles * n_split <= INT32_MAX && n_ctiles * n_csplit <= INT32_MAX && Hkv <= 65535 && B <= 65535,
              "multi_branch_attention (cuda): grid too large (B = ", B, ", Hkv = ", Hkv, ")");

  at::Tensor ws;
  AttnParams p{};
  if (!direct) {
    const int64_t slots = B * Hkv * R * (n_split + n_csplit) * Gc;
    ws = at::empty({slots * (Dv + 2)}, q.options().dtype(at::kFloat));
    p.ws_ml = ws.data_ptr<float>();
    p.ws_acc = p.ws_ml + 2 * slots;
  }
  p.q = q.data_ptr();
  p.sqb = q.stride(0);
  p.sqh = q.stride(1);
  p.sql = q.stride(2);
  p.segtab = segtab.data_ptr<int64_t>();
  p.seq_lens = segtab.data_ptr<int64_t>() + S * kSegFields;
  p.left_pad = p.seq_lens + S * B;
  p.shifts = sh.defined() ? sh.data_ptr<int64_t>() : nullptr;
  p.seg_pos = sp.defined() ? sp.data_ptr<int64_t>() : nullptr;
  p.q_pos = qpos.defined() ? qpos.data_ptr<int64_t>() : nullptr;
  p.inv_freq = inv.defined() ? inv.data_ptr<float>() : nullptr;
  p.temperature = tmp.defined() ? tmp.data_ptr<float>() : nullptr;
  p.lse_scale = lsc.defined() ? lsc.data_ptr<float>() : nullptr;
  p.log_weight = lw.defined() ? lw.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.window = window;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.S = static_cast<int>(S);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(G);
  p.Lq = static_cast<int>(Lq);
  p.D = static_cast<int>(D);
  p.Dv = static_cast<int>(Dv);
  p.R = static_cast<int>(R);
  p.rd = inv.defined() ? static_cast<int>(2 * inv.size(0)) : 0;
  p.n_tiles = static_cast<int>(n_tiles);
  p.n_split = static_cast<int>(n_split);
  p.Gc = static_cast<int>(Gc);
  p.ws_split = static_cast<int>(n_split + n_csplit);
  p.split_off = 0;
  p.cw = nwarps;
  p.neox = rope_neox;
  p.causal_last = causal_last;
  p.knobs = knobs;
  p.direct = direct;
  AttnParams pc = p;  // the cascade: its tiles, its splits after the per-row pass's in the workspace
  pc.n_tiles = static_cast<int>(n_ctiles);
  pc.n_split = static_cast<int>(n_csplit);
  pc.split_off = static_cast<int>(n_split);
  pc.cw = cwarps;
  pc.direct = false;

  const size_t smem = smem_bytes(BM, D, Dv, p.rd), smem_c = smem_bytes(BMc, D, Dv, p.rd);
  const size_t smem_max = n_shared > 0 ? std::max(smem, smem_c) : smem;
  TORCH_CHECK(smem_max <= props->sharedMemPerBlockOptin, "multi_branch_attention (cuda): needs ", smem_max,
              " bytes of shared memory, the device allows ", props->sharedMemPerBlockOptin);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "multi_branch_attention_cuda", [&] {
    if (n_own > 0) launch_attention<scalar_t, false>(p, Hkv, B, smem, stream);
    if (n_shared > 0) {
      RECORD_FUNCTION("pskernels::multi_branch_attention::cuda_cascade", std::vector<c10::IValue>());
      launch_attention<scalar_t, true>(pc, Hkv, 1, smem_c, stream);
    }
    if (!direct) {
      const int64_t nrows = B * Hq * Lq;
      const auto blocks = static_cast<unsigned>((nrows + kMergeWarps - 1) / kMergeWarps);
      mba_merge_kernel<scalar_t><<<blocks, 32 * kMergeWarps, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, lse};
}

}  // namespace cuda
}  // namespace pskernels
