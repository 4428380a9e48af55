// Shared helpers of the qc_cpu kernels: the ISA level, AVX-512 math (internal linkage).
#pragma once
#include <immintrin.h>

#define QC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define QC_AVX2 __attribute__((target("avx2,fma")))

// The instruction sets the kernels run with: 3 = AVX-512 with VNNI (wq_gemm takes VNNI-packed
// weights), 2 = AVX-512 (F, BW), 1 = AVX2 with FMA (wq_gemm
// only), 0 = neither. The CPU's best unless qc_cpu::set_isa chose a lower level
// (csrc/cpu_wq_gemm.cpp).
int qc_isa();

namespace {

// exp(x), a degree-7 polynomial of 2^f on |f| <= 1/2 scaled by VSCALEFPS (relative error ~1e-7).
QC_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // exp(-87) ~ 1.6e-38: smaller inputs give 0 anyway
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // e^f = 2^(t - n)
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace
