// The BLAS sgemm that libtorch already links (MKL in the x86-64 wheels), found at run time so the
// extension has no BLAS build dependency. Absent (or PSKERNELS_CPU_BLAS=0): callers use their own loops.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>

namespace pskernels {
namespace cpu {

// Fortran-ABI sgemm_ with 32-bit integers (LP64), column-major.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

// A BLAS function of libtorch (else of the process) by name; null with PSKERNELS_CPU_BLAS=0 or where absent.
inline void* blas_symbol(const char* name) {
  const char* env = std::getenv("PSKERNELS_CPU_BLAS");
  if (env != nullptr && env[0] == '0') return nullptr;
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* sym = lib != nullptr ? dlsym(lib, name) : nullptr;
  return sym != nullptr ? sym : dlsym(RTLD_DEFAULT, name);
}

inline SgemmFn blas_sgemm() {
  static const SgemmFn fn = reinterpret_cast<SgemmFn>(blas_symbol("sgemm_"));
  return fn;
}

// MKL's gemm_bf16bf16f32 / gemm_f16f16f32: 16-bit operands (as their uint16 bits), fp32 accumulation and result
// (AMX / AVX-512 BF16 / AVX512-FP16 where the CPU has them), the Fortran ABI of sgemm_. Absent (another BLAS, or
// PSKERNELS_CPU_BLAS=0): nullptr. Only taken where sgemm_ is found too, so callers that have one have both.
using HalfGemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                            const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*, const int*);

inline HalfGemmFn blas_gemm_bf16() {
  static const HalfGemmFn fn =
      blas_sgemm() != nullptr ? reinterpret_cast<HalfGemmFn>(blas_symbol("gemm_bf16bf16f32")) : nullptr;
  return fn;
}

inline HalfGemmFn blas_gemm_f16() {
  static const HalfGemmFn fn =
      blas_sgemm() != nullptr ? reinterpret_cast<HalfGemmFn>(blas_symbol("gemm_f16f16f32")) : nullptr;
  return fn;
}

// Row-major C[m, n] = A[m, k] . op(B) + beta * C, with B stored row-major as [n, k] (b_trans) or [k, n].
// Row-major C = A B is column-major C^T = B^T A^T, hence the swapped operands.
template <typename Fn, typename E>
inline void gemm_row_major(Fn gemm, bool b_trans, int m, int n, int k, const E* a, int lda, const E* b, int ldb,
                           float beta, float* c, int ldc) {
  const float one = 1.f;
  const char ta = b_trans ? 'T' : 'N', tb = 'N';
  gemm(&ta, &tb, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

}  // namespace cpu
}  // namespace pskernels
