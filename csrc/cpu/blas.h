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

inline SgemmFn blas_sgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
    const char* env = std::getenv("PSKERNELS_CPU_BLAS");
    if (env != nullptr && env[0] == '0') return nullptr;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, "sgemm_") : nullptr;
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "sgemm_");
    return reinterpret_cast<SgemmFn>(sym);
  }();
  return fn;
}

// MKL's gemm_bf16bf16f32 (bf16 operands as their uint16 bits, fp32 accumulation and result; AMX or AVX-512 BF16
// where the CPU has them), same Fortran ABI as sgemm_. Absent (another BLAS, or PSKERNELS_CPU_BLAS=0): nullptr.
using Bf16GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                            const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*, const int*);

inline Bf16GemmFn blas_gemm_bf16() {
  static const Bf16GemmFn fn = []() -> Bf16GemmFn {
    if (blas_sgemm() == nullptr) return nullptr;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, "gemm_bf16bf16f32") : nullptr;
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "gemm_bf16bf16f32");
    return reinterpret_cast<Bf16GemmFn>(sym);
  }();
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
