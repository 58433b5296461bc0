// The BLAS sgemm that libtorch already links (MKL in the x86-64 wheels), found at run time so the
// extension has no BLAS build dependency. Absent (or PSKERNELS_CPU_BLAS=0): callers use their own loops.
#pragma once

#include <dlfcn.h>

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

// Row-major C[m, n] = A[m, k] . op(B) + beta * C, with B stored row-major as [n, k] (b_trans) or [k, n].
// Row-major C = A B is column-major C^T = B^T A^T, hence the swapped operands.
inline void gemm_row_major(SgemmFn sgemm, bool b_trans, int m, int n, int k, const float* a, int lda, const float* b,
                           int ldb, float beta, float* c, int ldc) {
  const float one = 1.f;
  const char ta = b_trans ? 'T' : 'N', tb = 'N';
  sgemm(&ta, &tb, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

}  // namespace cpu
}  // namespace pskernels
