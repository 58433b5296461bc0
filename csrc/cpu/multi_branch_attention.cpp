// CPU multi-branch attention: one pass over every segment's keys where they are stored (no
// concatenation), query-side RoPE re-indexing, GQA without repeating K/V, split-KV across threads,
// and a log-sum-exp merge of (split, calibration group) partial states.
//
// Work item = (batch row, kv head, chunk of up to kRowChunk query rows, key split). The rows of a chunk
// are the (query head, query) pairs of one kv head, so each K/V block is read once for all of them.
// Scores and P.V are BLAS calls (libtorch's MKL) on the cache memory itself: sgemm for fp32, gemm_bf16bf16f32 /
// gemm_f16f16f32 for bf16 / fp16 (P rounded to the input's dtype for P.V, as flash attention does; fp32
// accumulation); 16-bit rows whose query was rotated (position shifts) convert one block to fp32 for sgemm, and
// BLAS-less builds use the loops below.
//
// Cascade: a segment broadcast over the batch (K and V with batch stride 0, e.g. a shared prefix cache
// expanded to the B worker rows) is attended first, in a pass of its own whose work item is (kv head, chunk
// of the stacked rows of all batch rows, key split); its partial states merge with the per-row pass's.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../multi_branch_attention_checks.h"
#include "../ops.h"
#include "blas.h"
#include "pskernels/math.h"

namespace pskernels {
namespace cpu {
namespace {

constexpr int64_t kRowChunk = 128;  // query rows sharing each K/V block
constexpr int64_t kKeyBlock = 256;  // keys per block (scores of a chunk: kRowChunk x kKeyBlock floats)
constexpr int64_t kSplitKeys = 256;  // fewest keys per split-KV part of the per-row pass
constexpr int kRows = 4, kCols = 16;  // register tile of the fallback loops

struct Segment {
  const void* k;
  const void* v;
  int64_t L, skb, skh, skl, svb, svh, svl;
};

struct Meta {
  const int64_t* seq_lens;   // [S, B]
  const int64_t* left_pad;   // [S, B]
  const int64_t* shifts;     // [S, B] or null
  const int64_t* seg_pos;    // [S, B] or null
  const int64_t* q_pos;      // [B, Lq] or null
  const int64_t* groups;     // [S]
  const float* inv_freq;     // [rotary_dim / 2] or null
  const float* temperature;  // [G, Hq] or null
  const float* lse_scale;    // [G, Hq] or null
  const float* log_weight;   // [G, Hq] or null
  int64_t rotary_dim;
  bool neox, causal_last, knobs;
  float scale, softcap;
  int64_t window;
};

// exp(x) for x <= 0 (a score minus its running max): 0 below -87 and for -inf, else within ~2 ulp
// (Cephes expf: Cody-Waite reduction by ln 2, degree-6 polynomial). Selects, not branches, so loops
// vectorise (with -fno-trapping-math, see setup.py). NaN scores never get here (the row is poisoned).
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float two_n = std::bit_cast<float>(bits);
  return x < -87.f ? 0.f : p * two_n;
}

template <typename T>
inline void load_rows(const void* src, int64_t ld, int64_t n, int64_t width, float* dst) {
  const T* p = static_cast<const T*>(src);
  for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) dst[j * width + d] = static_cast<float>(p[j * ld + d]);
  }
}

// s[r][j] = <q_r, k_j> for r < nr, j < nb (k rows ldk apart).
void scores_loops(const float* q, const float* k, int64_t ldk, float* s, int64_t nr, int64_t nb, int64_t D) {
  for (int64_t j = 0; j < nb; ++j) {
    const float* kj = k + j * ldk;
    int64_t r = 0;
    for (; r + kRows <= nr; r += kRows) {
      const float *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < D; ++d) {
        a0 += q0[d] * kj[d];
        a1 += q1[d] * kj[d];
        a2 += q2[d] * kj[d];
        a3 += q3[d] * kj[d];
      }
      s[r * kKeyBlock + j] = a0;
      s[(r + 1) * kKeyBlock + j] = a1;
      s[(r + 2) * kKeyBlock + j] = a2;
      s[(r + 3) * kKeyBlock + j] = a3;
    }
    for (; r < nr; ++r) {
      const float* qr = q + r * D;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) a += qr[d] * kj[d];
      s[r * kKeyBlock + j] = a;
    }
  }
}

// acc_r += sum_j p[r][j] v_j for r < nr (v rows ldv apart; row r's accumulator at acc + r * stride).
void accumulate_loops(const float* p, const float* v, int64_t ldv, float* acc, int64_t stride, int64_t nr, int64_t nb,
                      int64_t Dv) {
  int64_t r0 = 0;
  for (; r0 + kRows <= nr; r0 += kRows) {
    int64_t d0 = 0;
    for (; d0 + kCols <= Dv; d0 += kCols) {
      float a[kRows][kCols];
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kCols; ++c) a[r][c] = acc[(r0 + r) * stride + d0 + c];
      for (int64_t j = 0; j < nb; ++j) {
        const float* vj = v + j * ldv + d0;
        for (int r = 0; r < kRows; ++r) {
          const float pj = p[(r0 + r) * kKeyBlock + j];
#pragma omp simd
          for (int c = 0; c < kCols; ++c) a[r][c] += pj * vj[c];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < kCols; ++c) acc[(r0 + r) * stride + d0 + c] = a[r][c];
    }
    for (int r = 0; r < kRows; ++r)  // value dims past the last full kCols
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t d = d0; d < Dv; ++d) acc[(r0 + r) * stride + d] += p[(r0 + r) * kKeyBlock + j] * v[j * ldv + d];
  }
  for (; r0 < nr; ++r0)
    for (int64_t j = 0; j < nb; ++j) {
      const float pj = p[r0 * kKeyBlock + j];
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) acc[r0 * stride + d] += pj * v[j * ldv + d];
    }
}

// Slots [lo, hi] of segment s that query i (q head hq, calibration group g) of batch row b sees within [j0, j1):
// the row's valid slots, the causal (bottom-right) bound of the last segment and the sliding window; and the
// row's 1 / temperature. Shared by the per-row pass and the cascade, whose stacked rows come from several batch rows.
struct RowView {
  int64_t lo, hi;
  float inv_t;
};

inline RowView row_view(const Meta& mt, int64_t s, int64_t b, int64_t i, int64_t hq, int64_t g, int64_t j0, int64_t j1,
                        bool causal, int64_t B, int64_t Lq, int64_t Hq) {
  const int64_t len = mt.seq_lens[s * B + b];
  int64_t lo = std::max(j0, mt.left_pad[s * B + b]), hi = std::min(j1, len) - 1;
  if (causal) hi = std::min(hi, len - Lq + i);
  if (mt.window > 0) lo = std::max(lo, mt.q_pos[b * Lq + i] - mt.seg_pos[s * B + b] - mt.window + 1);
  return {lo, hi, mt.temperature ? 1.f / mt.temperature[g * Hq + hq] : 1.f};
}

// A work item's scratch: scores sc [rows, kKeyBlock], their 16-bit copy pb, one fp32 K and V block (kf, vf).
struct Scratch {
  std::vector<float> sc, kf, vf;
  std::vector<uint16_t> pb;
  Scratch(int64_t rows, int64_t D, int64_t Dv, bool half)
      : sc(rows * kKeyBlock), kf(kKeyBlock * D), vf(kKeyBlock * Dv), pb(half ? rows * kKeyBlock : 0) {}
};

struct Blas {
  SgemmFn sgemm;
  HalfGemmFn gemm_half;  // for T = bf16 / fp16, else null
};

// Folds keys [j0, j1) of one segment into the online-softmax states of nr query rows: q is [nr, D] (already
// rotated for this segment), row r sees slots [jlo[r], jhi[r]] and divides its scores by temperature
// (inv_t[r]); its state of the segment's group sits at st + r * row_stride. Blocks outside every row's
// range are never read. Used by the per-row pass and by the cascade, whose rows come from several batch rows.
// qh: the same rows as 16-bit patterns where they are exactly q (bf16 / fp16 input, not rotated), else null.
template <typename T>
void attend(const Segment& sg, int64_t kb, int64_t vb, int64_t j0, int64_t j1, const float* q, const uint16_t* qh,
            int64_t nr, int64_t D, int64_t Dv, const int64_t* jlo, const int64_t* jhi, const float* inv_t,
            const Meta& mt, float* st, int64_t row_stride, const Blas& blas, Scratch& w) {
  constexpr int64_t kAcc = 2;  // offset of the accumulator in a row's state (m, l, acc)
  int64_t lo = j1, hi = j0;
  for (int64_t r = 0; r < nr; ++r)
    if (jlo[r] <= jhi[r]) lo = std::min(lo, jlo[r]), hi = std::max(hi, jhi[r] + 1);
  lo = std::max(lo, j0), hi = std::min(hi, j1);
  // BLAS reads the cache where it is when its rows are BLAS rows: at least a row apart (a view expanded or
  // overlapping along the keys is not; MKL would refuse the call and leave the scores unwritten)
  const bool in_place = sg.skl >= D && sg.svl >= std::max<int64_t>(Dv, 1) && sg.skl <= INT_MAX && sg.svl <= INT_MAX;
  // 16-bit types through their BLAS at any row count: even a decode chunk's gemm beats converting the block for
  // the loops (bf16, SmolLM2 heads, 4161 keys, 3 rows: 0.57 -> 0.37 ms)
  const bool use_half = qh != nullptr && blas.gemm_half != nullptr && in_place;
  // BLAS at any row count (fp32 decode, 1-4 rows, 300-4161 keys: up to a third faster than the loops, which are
  // for BLAS-less builds; one exception measured, 1 row of D = 64, 6% slower). The 16-bit GEMM implies sgemm.
  const bool use_gemm = blas.sgemm != nullptr;
  const bool direct = std::is_same_v<T, float> && in_place;
  float* sc = w.sc.data();
  for (int64_t jb = lo; jb < hi; jb += kKeyBlock) {
    const int64_t nb = std::min<int64_t>(kKeyBlock, hi - jb);
    const float *kp = nullptr, *vp = nullptr;
    const uint16_t *kh = nullptr, *vh = nullptr;
    int64_t ldk, ldv;
    if (use_half) {
      kh = static_cast<const uint16_t*>(sg.k) + kb + jb * sg.skl, ldk = sg.skl;
      vh = static_cast<const uint16_t*>(sg.v) + vb + jb * sg.svl, ldv = sg.svl;
    } else if (direct) {
      kp = static_cast<const float*>(sg.k) + kb + jb * sg.skl, ldk = sg.skl;
      vp = static_cast<const float*>(sg.v) + vb + jb * sg.svl, ldv = sg.svl;
    } else {
      load_rows<T>(static_cast<const T*>(sg.k) + kb + jb * sg.skl, sg.skl, nb, D, w.kf.data());
      load_rows<T>(static_cast<const T*>(sg.v) + vb + jb * sg.svl, sg.svl, nb, Dv, w.vf.data());
      kp = w.kf.data(), ldk = D, vp = w.vf.data(), ldv = Dv;
    }
    if (use_half)
      gemm_row_major(blas.gemm_half, true, static_cast<int>(nr), static_cast<int>(nb), static_cast<int>(D), qh,
                     static_cast<int>(D), kh, static_cast<int>(ldk), 0.f, sc, static_cast<int>(kKeyBlock));
    else if (use_gemm)
      gemm_row_major(blas.sgemm, true, static_cast<int>(nr), static_cast<int>(nb), static_cast<int>(D), q,
                     static_cast<int>(D), kp, static_cast<int>(ldk), 0.f, sc, static_cast<int>(kKeyBlock));
    else
      scores_loops(q, kp, ldk, sc, nr, nb, D);
    for (int64_t r = 0; r < nr; ++r) {
      float* x = sc + r * kKeyBlock;
      if (mt.softcap > 0.f) {
        for (int64_t jj = 0; jj < nb; ++jj) x[jj] = soft_cap(x[jj] * mt.scale, mt.softcap) * inv_t[r];
      } else {
        const float mul = mt.scale * inv_t[r];
#pragma omp simd
        for (int64_t jj = 0; jj < nb; ++jj) x[jj] *= mul;
      }
      // mask outside this row's visible range [jlo, jhi] of slots
      const int64_t vlo = std::clamp<int64_t>(jlo[r] - jb, 0, nb), vend = std::clamp<int64_t>(jhi[r] + 1 - jb, vlo, nb);
      std::fill(x, x + vlo, kNegInf);
      std::fill(x + vend, x + nb, kNegInf);
      // The block's max skips NaN scores (a compare, so it vectorises: a NaN test in the same loop kept GCC
      // scalar, 18% of a decode step); a NaN score still poisons the row below, through l or the scan.
      float mb = kNegInf;
#pragma omp simd reduction(max : mb)
      for (int64_t jj = vlo; jj < vend; ++jj) mb = x[jj] > mb ? x[jj] : mb;
      float* so = st + r * row_stride;
      const auto poison = [&] {  // a NaN score (NaN/Inf in q or k): the row's state becomes NaN, never a dropped key
        std::fill(so, so + kAcc + Dv, std::numeric_limits<float>::quiet_NaN());
        std::fill(x, x + nb, 0.f);
      };
      if (mb == kNegInf) {  // nothing visible in this block (p = 0 leaves the state unchanged), or only NaN
        if (std::any_of(x + vlo, x + vend, [](float y) { return y != y; }))
          poison();
        else
          std::fill(x, x + nb, 0.f);
        continue;
      }
      const float m = std::max(so[0], mb);
      const float f = rescale(so[0], m);
      float l = 0.f;
#pragma omp simd reduction(+ : l)
      for (int64_t jj = 0; jj < nb; ++jj) {
        x[jj] = exp_nonpos(x[jj] - m);
        l += x[jj];
      }
      if (l != l) {  // exp_nonpos(NaN) is NaN: a NaN score reaches the sum
        poison();
        continue;
      }
      float* acc = so + kAcc;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) acc[d] *= f;
      so[0] = m;
      so[1] = so[1] * f + l;
    }
    if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
      if (use_half) {
        uint16_t* pb = w.pb.data();
        for (int64_t r = 0; r < nr; ++r)
#pragma omp simd
          for (int64_t jj = 0; jj < nb; ++jj)
            pb[r * kKeyBlock + jj] = std::bit_cast<uint16_t>(T(sc[r * kKeyBlock + jj]));
        gemm_row_major(blas.gemm_half, false, static_cast<int>(nr), static_cast<int>(Dv), static_cast<int>(nb), pb,
                       static_cast<int>(kKeyBlock), vh, static_cast<int>(ldv), 1.f, st + kAcc,
                       static_cast<int>(row_stride));
        continue;
      }
    }
    if (use_gemm) {
      gemm_row_major(blas.sgemm, false, static_cast<int>(nr), static_cast<int>(Dv), static_cast<int>(nb), sc,
                     static_cast<int>(kKeyBlock), vp, static_cast<int>(ldv), 1.f, st + kAcc,
                     static_cast<int>(row_stride));
    } else {
      accumulate_loops(sc, vp, ldv, st + kAcc, row_stride, nr, nb, Dv);
    }
  }
}

// Splits of a work list of `items` items over `keys` keys (at least `min_keys` each): about 4 items per
// thread, rounded up to a multiple of the thread count where possible so that every thread gets the same work.
int64_t choose_splits(int64_t items, int64_t keys, int64_t min_keys) {
  const int64_t threads = at::get_num_threads(), max_split = std::max<int64_t>(1, keys / min_keys);
  int64_t n_split = std::min(max_split, std::max<int64_t>(1, (4 * threads + items - 1) / items));
  while (n_split < max_split && (items * n_split) % threads != 0) ++n_split;
  return n_split;
}

// The cascade can be switched off per call (PSKERNELS_CPU_CASCADE=0), for A/B measurements in one process.
bool cascade_enabled() {
  const char* env = std::getenv("PSKERNELS_CPU_CASCADE");
  return env == nullptr || env[0] != '0';
}

template <typename T>
void run(const at::Tensor& q, const std::vector<Segment>& segs, const Meta& mt, int64_t Hkv, int64_t Dv,
         at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t S = static_cast<int64_t>(segs.size());
  const int64_t G = Hq / Hkv, R = G * Lq;
  const int64_t chunk = std::min(R, kRowChunk);
  const int64_t n_chunks = (R + chunk - 1) / chunk;
  int64_t Gc = 1;
  if (mt.knobs)
    for (int64_t s = 0; s < S; ++s) Gc = std::max(Gc, mt.groups[s] + 1);
  const int64_t state = Dv + 2;  // m, l, acc[Dv]
  const int64_t row_stride = Gc * state;
  const int64_t sqb = q.stride(0), sqh = q.stride(1), sql = q.stride(2);
  const T* qp = q.data_ptr<T>();
  constexpr bool kHalf = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  const Blas blas{blas_sgemm(), std::is_same_v<T, c10::BFloat16> ? blas_gemm_bf16()
                                : std::is_same_v<T, c10::Half>   ? blas_gemm_f16()
                                                                 : nullptr};
  // q rows as 16-bit patterns, for the 16-bit BLAS: exactly the input (the fp32 copies qf are exact too)
  auto load_bits = [&](const T* src, uint16_t* dst) {
    if constexpr (kHalf) std::memcpy(dst, src, D * sizeof(uint16_t));
  };

  // Cascade (Hydragen / FlashInfer): a segment stored once for all rows (K and V broadcast over the batch,
  // batch stride 0) is attended by the queries of every row together: the M = B * R rows of a kv head are
  // stacked and cut into chunks of kRowChunk, so each chunk reads the segment's K/V once (one sgemm for the
  // scores, one for P.V) where the per-row pass reads it once per batch row. Per-row metadata (lengths,
  // padding, shifts, causal, window) only masks or rotates individual stacked rows. It is taken where it at
  // least halves the passes over the segment (ceil(M / kRowChunk) <= B * n_chunks / 2): any B > 1 whose
  // stacked rows fit one chunk (decode, M = B * G), and short prefills of larger batches. Where a row's own
  // rows already fill most of a chunk (R = G * Lq near kRowChunk or above) the per-row pass keeps the
  // segment: its sgemm calls are as large, it parallelises over rows and it skips each row's masked keys,
  // while the cascade computes scores for the union of the rows' ranges (cheap next to the memory saved in
  // decode). Split-KV over the segment keeps the threads busy although there are only Hkv * chunks items.
  const int64_t M = B * R, cchunk = std::min(M, kRowChunk);
  const int64_t n_cchunks = (M + cchunk - 1) / cchunk;
  const bool stack = B > 1 && 2 * n_cchunks <= B * n_chunks && cascade_enabled();
  std::vector<char> shared(S, 0);
  std::vector<int64_t> ulo(S, 0), uhi(S, 0);  // union over rows of each shared segment's valid slots
  int64_t ctotal = 0;
  for (int64_t s = 0; s < S && stack; ++s) {
    if (segs[s].skb != 0 || segs[s].svb != 0) continue;
    shared[s] = 1;
    ulo[s] = segs[s].L;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pad = mt.left_pad[s * B + b], len = mt.seq_lens[s * B + b];
      if (len > pad) ulo[s] = std::min(ulo[s], pad), uhi[s] = std::max(uhi[s], len);
    }
    uhi[s] = std::max(uhi[s], ulo[s]);
    ctotal += uhi[s] - ulo[s];
  }

  // Keys of the remaining segments visible to row b, flattened over segments, decide the split-KV partition.
  std::vector<int64_t> total(B, 0);
  int64_t max_total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s)
      if (!shared[s]) total[b] += std::max<int64_t>(0, mt.seq_lens[s * B + b] - mt.left_pad[s * B + b]);
    max_total = std::max(max_total, total[b]);
  }
  const int64_t items0 = B * Hkv * n_chunks;
  const int64_t n_split = choose_splits(items0, max_total, kSplitKeys);
  std::vector<float> part(static_cast<size_t>(items0 * n_split * chunk * row_stride));
  auto init_states = [&](float* st, int64_t rows) {
    for (int64_t x = 0; x < rows * Gc; ++x) {
      st[x * state] = kNegInf;
      std::fill(st + x * state + 1, st + (x + 1) * state, 0.f);
    }
  };

  const int64_t citems0 = ctotal > 0 ? Hkv * n_cchunks : 0;
  // A cascade item holds up to kRowChunk rows against each key: splits of fewer keys still carry enough work
  // to pay for their partial states, and a short shared segment still spreads over the threads.
  const int64_t n_csplit = ctotal > 0 ? choose_splits(citems0, ctotal, kSplitKeys / 4) : 0;
  std::vector<float> cpart(static_cast<size_t>(citems0 * n_csplit * cchunk * row_stride));
  if (ctotal > 0) {
    RECORD_FUNCTION("pskernels::multi_branch_attention::cpu_cascade", std::vector<c10::IValue>());
    at::parallel_for(0, citems0 * n_csplit, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(cchunk * D), qr(cchunk * D), inv_t(cchunk);
      std::vector<uint16_t> qh(blas.gemm_half ? cchunk * D : 0);
      Scratch w(cchunk, D, Dv, blas.gemm_half != nullptr);
      std::vector<int64_t> jlo(cchunk), jhi(cchunk), rb(cchunk), rq(cchunk), ri(cchunk);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t split = item % n_csplit;
        const int64_t cc = (item / n_csplit) % n_cchunks;
        const int64_t hkv = item / n_csplit / n_cchunks;
        float* st = cpart.data() + item * cchunk * row_stride;
        const int64_t m0 = cc * cchunk, nr = std::min(cchunk, M - m0);
        init_states(st, nr);
        for (int64_t r = 0; r < nr; ++r) {  // stacked row m = (batch row b, query head hq, query i)
          const int64_t m = m0 + r, b = m / R, hq = hkv * G + (m % R) / Lq, i = (m % R) % Lq;
          rb[r] = b, rq[r] = hq, ri[r] = i;
          const T* src = qp + b * sqb + hq * sqh + i * sql;
          for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]);
          if (!qh.empty()) load_bits(src, qh.data() + r * D);
        }
        const int64_t per = (ctotal + n_csplit - 1) / n_csplit;
        const int64_t lo = split * per, hi = std::min(ctotal, lo + per);
        int64_t flat = 0;  // flattened index of the current shared segment's first slot of the union
        for (int64_t s = 0; s < S; ++s) {
          if (!shared[s]) continue;
          const int64_t n = uhi[s] - ulo[s];
          const int64_t a = std::max(lo, flat), e = std::min(hi, flat + n);
          const int64_t j0 = ulo[s] + (a - flat), j1 = ulo[s] + (e - flat);
          flat += n;
          if (j0 >= j1) continue;
          const float* qrow = qf.data();
          const uint16_t* qbits = qh.empty() ? nullptr : qh.data();
          if (mt.shifts) {  // the rotation by -shift is per batch row: only the rows of shifted rows change
            std::copy(qf.begin(), qf.begin() + nr * D, qr.begin());
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t shift = mt.shifts[s * B + rb[r]];
              if (shift != 0) {
                rope_rotate(qr.data() + r * D, static_cast<int>(mt.rotary_dim), mt.neox, mt.inv_freq,
                            -static_cast<float>(shift));
                qbits = nullptr;  // a rotated query is not a 16-bit value: this segment takes the fp32 path
              }
            }
            qrow = qr.data();
          }
          const int64_t g = mt.knobs ? mt.groups[s] : 0;
          const bool causal = mt.causal_last && s == S - 1;
          for (int64_t r = 0; r < nr; ++r) {
            const RowView v = row_view(mt, s, rb[r], ri[r], rq[r], g, j0, j1, causal, B, Lq, Hq);
            jlo[r] = v.lo;
            jhi[r] = v.hi;
            inv_t[r] = v.inv_t;
          }
          const Segment& sg = segs[s];
          attend<T>(sg, hkv * sg.skh, hkv * sg.svh, j0, j1, qrow, qbits, nr, D, Dv, jlo.data(), jhi.data(),
                    inv_t.data(), mt, st + g * state, row_stride, blas, w);
        }
      }
    });
  }

  at::parallel_for(0, items0 * n_split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(chunk * D, 0.f), qr(chunk * D, 0.f), inv_t(chunk);
    std::vector<uint16_t> qh(blas.gemm_half ? chunk * D : 0);
    Scratch w(chunk, D, Dv, blas.gemm_half != nullptr);
    std::vector<int64_t> jlo(chunk), jhi(chunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t split = item % n_split;
      const int64_t ck = (item / n_split) % n_chunks;
      const int64_t hkv = (item / n_split / n_chunks) % Hkv;
      const int64_t b = item / n_split / n_chunks / Hkv;
      float* st = part.data() + item * chunk * row_stride;
      init_states(st, chunk);
      const int64_t r0 = ck * chunk, nr = std::min(chunk, R - r0);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t hq = hkv * G + (r0 + r) / Lq, i = (r0 + r) % Lq;
        const T* src = qp + b * sqb + hq * sqh + i * sql;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = static_cast<float>(src[d]);
        if (!qh.empty()) load_bits(src, qh.data() + r * D);
      }
      const int64_t per = (total[b] + n_split - 1) / n_split;
      const int64_t lo = split * per, hi = std::min(total[b], lo + per);
      int64_t flat = 0;  // flattened index of the current segment's first valid key
      for (int64_t s = 0; s < S; ++s) {
        if (shared[s]) continue;
        const Segment& sg = segs[s];
        const int64_t pad = mt.left_pad[s * B + b], len = mt.seq_lens[s * B + b];
        const int64_t nvalid = std::max<int64_t>(0, len - pad);
        const int64_t a = std::max(lo, flat), e = std::min(hi, flat + nvalid);
        const int64_t j0 = pad + (a - flat), j1 = pad + (e - flat);
        flat += nvalid;
        if (j0 >= j1) continue;
        const int64_t shift = mt.shifts ? mt.shifts[s * B + b] : 0;
        const float* qrow = qf.data();
        if (shift != 0) {
          std::copy(qf.begin(), qf.begin() + nr * D, qr.begin());
          for (int64_t r = 0; r < nr; ++r)
            rope_rotate(qr.data() + r * D, static_cast<int>(mt.rotary_dim), mt.neox, mt.inv_freq,
                        -static_cast<float>(shift));
          qrow = qr.data();
        }
        const int64_t g = mt.knobs ? mt.groups[s] : 0;
        const bool causal = mt.causal_last && s == S - 1;
        // [j0, j1) lies inside the row's valid slots here: row_view adds the causal and window bounds
        for (int64_t r = 0; r < nr; ++r) {
          const RowView v = row_view(mt, s, b, (r0 + r) % Lq, hkv * G + (r0 + r) / Lq, g, j0, j1, causal, B, Lq, Hq);
          jlo[r] = v.lo;
          jhi[r] = v.hi;
          inv_t[r] = v.inv_t;
        }
        attend<T>(sg, b * sg.skb + hkv * sg.skh, b * sg.svb + hkv * sg.svh, j0, j1, qrow,
                  shift != 0 || qh.empty() ? nullptr : qh.data(), nr, D, Dv, jlo.data(), jhi.data(), inv_t.data(), mt,
                  st + g * state, row_stride, blas, w);
      }
    }
  });

  // Merge splits (per-row and cascade) within each group, calibrate groups, merge groups.
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * Hkv * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(Gc * Dv), logit(Gc), inv_l(Gc);
    std::vector<SoftmaxState> gs(Gc);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t row = x % R, hkv = (x / R) % Hkv, b = x / R / Hkv;
      const int64_t hq = hkv * G + row / Lq, i = row % Lq;
      const int64_t ck = row / chunk, r = row % chunk;
      const int64_t m = b * R + row, cc = m / cchunk, cr = m % cchunk;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < Gc; ++g) {
        gs[g] = empty_state();
        auto merge = [&](const float* so) {
          float fa, fb;
          merge_factors(gs[g], SoftmaxState{so[0], so[1]}, fa, fb);
          for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] = acc[g * Dv + d] * fa + so[2 + d] * fb;
        };
        for (int64_t split = 0; split < n_split; ++split) {
          const int64_t item = ((b * Hkv + hkv) * n_chunks + ck) * n_split + split;
          merge(part.data() + (item * chunk + r) * row_stride + g * state);
        }
        for (int64_t split = 0; split < n_csplit; ++split) {
          const int64_t item = (hkv * n_cchunks + cc) * n_csplit + split;
          merge(cpart.data() + (item * cchunk + cr) * row_stride + g * state);
        }
        float lg = state_lse(gs[g]);
        if (mt.knobs && lg != kNegInf) {
          const int64_t k = g * Hq + hq;
          if (mt.temperature) lg *= mt.temperature[k];
          if (mt.lse_scale) lg *= mt.lse_scale[k];
          if (mt.log_weight) lg += mt.log_weight[k];
        }
        logit[g] = lg;
        inv_l[g] = gs[g].l > 0.f ? 1.f / gs[g].l : 0.f;
      }
      float Mx = kNegInf;
      for (int64_t g = 0; g < Gc; ++g) Mx = logit[g] != logit[g] || logit[g] > Mx ? logit[g] : Mx;  // NaN wins
      T* o = op + ((b * Hq + hq) * Lq + i) * Dv;
      if (Mx == kNegInf) {
        for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(0.f);
        lp[(b * Hq + hq) * Lq + i] = kNegInf;
        continue;
      }
      float wsum = 0.f;
      std::vector<float>& w = logit;
      for (int64_t g = 0; g < Gc; ++g) {
        w[g] = logit[g] == kNegInf ? 0.f : expf(logit[g] - Mx);
        wsum += w[g];
      }
      for (int64_t d = 0; d < Dv; ++d) {
        float y = 0.f;
        for (int64_t g = 0; g < Gc; ++g) y += w[g] * acc[g * Dv + d] * inv_l[g];
        o[d] = static_cast<T>(y / wsum);
      }
      lp[(b * Hq + hq) * Lq + i] = Mx + logf(wsum);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_branch_attention(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const at::Tensor& seq_lens,
    const at::Tensor& left_pad, const c10::optional<at::Tensor>& shifts,
    const c10::optional<at::Tensor>& segment_positions, const c10::optional<at::Tensor>& query_positions,
    const c10::optional<at::Tensor>& inv_freq, bool rope_neox, bool causal_last, double scale, double softcap,
    int64_t window, const at::Tensor& groups, const c10::optional<at::Tensor>& temperature,
    const c10::optional<at::Tensor>& lse_scale, const c10::optional<at::Tensor>& log_weight) {
  const auto S = static_cast<int64_t>(keys.size());
  const auto host = check_segments(q, keys, values, seq_lens, left_pad, shifts, segment_positions, query_positions,
                                   inv_freq, window, groups, temperature, lse_scale, log_weight);
  TORCH_CHECK(q.device().is_cpu(), "multi_branch_attention (cpu): q must be a CPU tensor, got ", q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Hkv = keys[0].size(1), Dv = values[0].size(3);
  std::vector<Segment> segs;
  for (int64_t s = 0; s < S; ++s) {
    const auto &k = keys[s], &v = values[s];
    segs.push_back({k.data_ptr(), v.data_ptr(), k.size(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                    v.stride(1), v.stride(2)});
  }
  auto i64 = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  auto f32 = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  at::Tensor grp = groups.contiguous();
  at::Tensor sh = i64(shifts), sp = i64(segment_positions), qpos = i64(query_positions);
  at::Tensor inv = f32(inv_freq), tmp = f32(temperature), lsc = f32(lse_scale), lw = f32(log_weight);
  Meta mt;
  mt.seq_lens = host.lens.data_ptr<int64_t>();
  mt.left_pad = host.pads.data_ptr<int64_t>();
  mt.shifts = sh.defined() ? sh.data_ptr<int64_t>() : nullptr;
  mt.seg_pos = sp.defined() ? sp.data_ptr<int64_t>() : nullptr;
  mt.q_pos = qpos.defined() ? qpos.data_ptr<int64_t>() : nullptr;
  mt.groups = grp.data_ptr<int64_t>();
  mt.inv_freq = inv.defined() ? inv.data_ptr<float>() : nullptr;
  mt.rotary_dim = inv.defined() ? 2 * inv.size(0) : 0;
  mt.temperature = tmp.defined() ? tmp.data_ptr<float>() : nullptr;
  mt.lse_scale = lsc.defined() ? lsc.data_ptr<float>() : nullptr;
  mt.log_weight = lw.defined() ? lw.data_ptr<float>() : nullptr;
  mt.knobs = mt.temperature || mt.lse_scale || mt.log_weight;
  mt.neox = rope_neox;
  mt.causal_last = causal_last;
  mt.scale = static_cast<float>(scale);
  mt.softcap = static_cast<float>(softcap);
  mt.window = window;
  auto out = at::empty({B, Hq, Lq, Dv}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "multi_branch_attention_cpu", [&] {
    run<scalar_t>(q, segs, mt, Hkv, Dv, out, lse);
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace pskernels
