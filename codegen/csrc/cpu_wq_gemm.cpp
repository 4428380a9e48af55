// qc_cpu::wq_gemm: y = x @ dequant(W)^T + bias for weight-only int4/int8 linears on x86 CPUs with
// AVX-512 (F, BW), fp32 activations and accumulation; with AVX512-VNNI, int8 activations and
// integer dot products (below); with AVX2 + FMA, the fp32 form in 8-lane registers.
//
// Weights are repacked at load time (codegen/cpu_native.py) into blocks of 16 output channels,
// channel-minor: for int4, per 2 consecutive k a block holds 16 bytes, byte j = channel j with
// the nibble of k low and of k + 1 high (the canonical bytes, transposed within the block); for
// int8, per k 16 signed bytes. One fp32 register holds 16 channels. Per group of G k's:
//     y[n] += s[n, g] * sum_k q[n, k] x[k]  +  b[n, g] * sum_k x[k],      b = -zero * s
// with q = u - 8 for int4 (a 16-entry VPERMPS table of u - 8: it reads the low 4 index bits) and
// the signed byte for int8 (per channel: one group spanning K). The scale multiplies a partial sum
// once per group, and a weight block is converted once for up to kMaxRows rows of x: the
// conversion shares execution ports with the FMAs, so more rows per conversion is more FMAs
// per cycle (batched decode: 16 sequences run as one tile).
//
// Without AVX-512 (qc_isa() == 1): the same layout and sums with AVX2 + FMA, 16 channels as two
// 8-lane registers, a k at a time, up to kMaxRows2 rows a tile; int4 codes u are converted as
// they are and the -8 folded into the group's offset: s * sum (u - 8) x = s * sum u x - 8 s sum x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "qc_avx512.h"

#include <array>
#include <cstring>
#include <atomic>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxRows = 16;
// Weights stream from L3 or DRAM: software prefetch this far ahead of the loads.
constexpr int kPrefetch = 8192;

template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void load4(
    const uint8_t* w, __m512 lut, __m512& w0, __m512& w1, __m512& w2, __m512& w3) {
  if constexpr (BITS == 4) {  // 32 bytes: k, k + 1 (first 16), k + 2, k + 3 (next 16)
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    w0 = _mm512_permutexvar_ps(a, lut);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(a, 4), lut);
    w2 = _mm512_permutexvar_ps(b, lut);
    w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
  } else {  // 64 bytes: k .. k + 3
    const __m128i* p = reinterpret_cast<const __m128i*>(w);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
    w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 2)));
    w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 3)));
  }
}

// R rows x 16 channels over all of K: four k per iteration. Up to 4 rows, four accumulators per
// row; 5-8, two; 9-16, one (R x A independent FMA chains are enough to fill both FMA ports, and
// R x A stays within the 32 vector registers beside the weights).
template <int R, int BITS>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void block_rows(const float* x, int64_t ldx, const float* sumx, const uint8_t* w, const float* s,
                const float* b, const float* bias, int64_t K, int64_t group, float* y, int64_t ldy,
                int64_t n0, int64_t N) {
  const __m512 lut = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
  constexpr int step = 16 * BITS / 2;  // bytes per 4 k
  const int64_t G = K / group, quads = group / 4;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    constexpr int A = R <= 4 ? 4 : (R <= 8 ? 2 : 1);
    __m512 acc[R][A];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_ps();
    const float* xg = x + g * group;
    for (int64_t i = 0; i < quads; ++i) {
      __m512 w0, w1, w2, w3;
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T0);
      load4<BITS>(w, lut, w0, w1, w2, w3);
      w += step;
      for (int r = 0; r < R; ++r) {
        const float* xr = xg + r * ldx + i * 4;
        acc[r][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xr[0]), acc[r][0]);
        acc[r][1 % A] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xr[1]), acc[r][1 % A]);
        acc[r][2 % A] = _mm512_fmadd_ps(w2, _mm512_set1_ps(xr[2]), acc[r][2 % A]);
        acc[r][3 % A] = _mm512_fmadd_ps(w3, _mm512_set1_ps(xr[3]), acc[r][3 % A]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + g * 16), bv = _mm512_loadu_ps(b + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 a = A == 4 ? _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1 % A]), _mm512_add_ps(acc[r][2 % A], acc[r][3 % A]))
                     : A == 2 ? _mm512_add_ps(acc[r][0], acc[r][1 % A]) : acc[r][0];
      total[r] = _mm512_fmadd_ps(a, sv, total[r]);
      total[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(sumx[r * G + g]), total[r]);
    }
  }
  const int64_t valid = N - n0 < 16 ? N - n0 : 16;
  const __mmask16 m = (__mmask16)((1u << valid) - 1);
  const __m512 bb = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + n0, m, _mm512_add_ps(total[r], bb));
}

constexpr int kMaxRows2 = 4;  // AVX2: 2 x R accumulators of the 16 vector registers

template <int R, int BITS>
QC_AVX2 void block_rows_avx2(const float* x, int64_t ldx, const float* sumx, const uint8_t* w, const float* s,
                             const float* b, const float* bias, int64_t K, int64_t group, float* y, int64_t ldy,
                             int64_t n0, int64_t N) {
  constexpr int step = 16 * BITS / 2;  // bytes per 4 k
  const int64_t G = K / group, quads = group / 4;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  __m256 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* xg = x + g * group;
    for (int64_t i = 0; i < quads; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T0);
      for (int kk = 0; kk < 4; ++kk) {
        __m256 lo, hi;
        if constexpr (BITS == 4) {  // channels 0-7 and 8-15 of k, k + 1: low nibble k, high k + 1
          const uint8_t* p = w + (kk / 2) * 16;
          __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
          __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
          a = kk % 2 ? _mm256_srli_epi32(a, 4) : _mm256_and_si256(a, nibble);
          c = kk % 2 ? _mm256_srli_epi32(c, 4) : _mm256_and_si256(c, nibble);
          lo = _mm256_cvtepi32_ps(a);
          hi = _mm256_cvtepi32_ps(c);
        } else {
          const uint8_t* p = w + kk * 16;
          lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
          hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
        }
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_broadcast_ss(xg + r * ldx + i * 4 + kk);
          acc[r][0] = _mm256_fmadd_ps(lo, xv, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(hi, xv, acc[r][1]);
        }
      }
      w += step;
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_loadu_ps(s + g * 16 + h * 8);
      __m256 bv = _mm256_loadu_ps(b + g * 16 + h * 8);
      if constexpr (BITS == 4) bv = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sv, bv);  // b - 8 s
      for (int r = 0; r < R; ++r) {
        total[r][h] = _mm256_fmadd_ps(acc[r][h], sv, total[r][h]);
        total[r][h] = _mm256_fmadd_ps(bv, _mm256_set1_ps(sumx[r * G + g]), total[r][h]);
      }
    }
  }
  const int64_t valid = N - n0 < 16 ? N - n0 : 16;
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[16];
    _mm256_store_ps(out, total[r][0]);
    _mm256_store_ps(out + 8, total[r][1]);
    for (int64_t j = 0; j < valid; ++j) y[r * ldy + n0 + j] = out[j] + (bias ? bias[n0 + j] : 0.f);
  }
}

// VNNI (qc_isa() == 3): activations quantized to int8 per row and block of A k's (A: the largest
// of 32, 16, 8 dividing the group), x ~= sx[r, a] * qx[r, k], then integer dot products of the
// unsigned codes u with qx (VPDPBUSD, 64 products an instruction), exact in int32:
//     y[n] += s[n, g] * sum_a sx[r, a] * sum_k u[n, k] qx[r, k]  +  (b[n, g] - off * s[n, g]) * xs[r, g]
// with xs[r, g] = sum_a sx[r, a] * sum_k qx[r, k], off = 8 (int4) or 128 (int8 codes stored as
// u = q + 128). The result is the linear of the dequantized activations (codegen/ops.py
// int8_activations_ref) up to fp32 summation order.
// Layout (codegen/cpu_native.py pack_native for "vnni"), per block of 16 channels, 64 bytes a
// step: int4, 8 k a step, byte 4j + t = u[j, k + t] | u[j, k + 4 + t] << 4; int8, 4 k a step,
// byte 4j + t = u[j, k + t].
constexpr int kMaxRowsVnni = 8;
#define QC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

struct QuantizedRows {
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> sx;  // [M, K / A]
  std::vector<float> xs;  // [M, G]
};

QC_VNNI QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t A, int64_t group) {
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * (K / A)), std::vector<float>(M * (K / group), 0.f)};
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t a = 0; a < K / A; ++a) {
      const float* xa = x + r * K + a * A;
      __m512 m = _mm512_setzero_ps();
      for (int64_t k = 0; k < A; k += 16) {
        const __mmask16 valid = (__mmask16)(A - k >= 16 ? 0xFFFF : (1u << (A - k)) - 1);
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(valid, xa + k)));
      }
      const float amax = _mm512_reduce_max_ps(m);
      const float inv = amax > 0.f ? 127.f / amax : 0.f, sx = amax / 127.f;
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < A; k += 16) {
        const __mmask16 valid = (__mmask16)(A - k >= 16 ? 0xFFFF : (1u << (A - k)) - 1);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(valid, xa + k), _mm512_set1_ps(inv)));
        _mm512_mask_cvtsepi32_storeu_epi8(out.q.data() + r * K + a * A + k, valid, q);
        sum = _mm512_add_epi32(sum, q);
      }
      out.sx[r * (K / A) + a] = sx;
      out.xs[r * (K / group) + a * A / group] += sx * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
  }
  return out;
}

QC_VNNI inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows x 16 channels over all of K. Up to 4 rows two int32 accumulators a row, else one.
template <int R, int BITS>
QC_VNNI void block_rows_vnni(const int8_t* qx, const float* sx, const float* xs, const uint8_t* w, const float* s,
                             const float* b, const float* bias, int64_t K, int64_t group, int64_t A, float* y,
                             int64_t ldy, int64_t n0, int64_t N) {
  constexpr int per_step = BITS == 4 ? 8 : 4;  // k a 64-byte step
  constexpr int C = R <= 4 ? 2 : 1;
  const int64_t G = K / group, NA = K / A, steps = A / per_step;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 off = _mm512_set1_ps(BITS == 4 ? 8.f : 128.f);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 accf[R];
    for (int r = 0; r < R; ++r) accf[r] = _mm512_setzero_ps();
    for (int64_t a = g * (group / A); a < (g + 1) * (group / A); ++a) {
      __m512i acc[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
      for (int64_t i = 0; i < steps; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(w);
        w += 64;
        const int64_t k = a * A + i * per_step;
        if constexpr (BITS == 4) {
          const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], lo, bcast4(qx + r * K + k));
            acc[r][C - 1] = _mm512_dpbusd_epi32(acc[r][C - 1], hi, bcast4(qx + r * K + k + 4));
          }
        } else {
          for (int r = 0; r < R; ++r) acc[r][i % C] = _mm512_dpbusd_epi32(acc[r][i % C], v, bcast4(qx + r * K + k));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i t = C == 2 ? _mm512_add_epi32(acc[r][0], acc[r][C - 1]) : acc[r][0];
        accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sx[r * NA + a]), accf[r]);
      }
    }
    const __m512 sv = _mm512_loadu_ps(s + g * 16), bv = _mm512_fnmadd_ps(off, sv, _mm512_loadu_ps(b + g * 16));
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_fmadd_ps(accf[r], sv, total[r]);
      total[r] = _mm512_fmadd_ps(bv, _mm512_set1_ps(xs[r * G + g]), total[r]);
    }
  }
  const int64_t valid = N - n0 < 16 ? N - n0 : 16;
  const __mmask16 m = (__mmask16)((1u << valid) - 1);
  const __m512 bb = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + n0, m, _mm512_add_ps(total[r], bb));
}

using VnniFn = void (*)(const int8_t*, const float*, const float*, const uint8_t*, const float*, const float*,
                        const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
template <int BITS, size_t... R>
constexpr std::array<VnniFn, sizeof...(R) + 1> vnni_blocks(std::index_sequence<R...>) {
  return {nullptr, block_rows_vnni<R + 1, BITS>...};
}
constexpr auto kBlocks4Vnni = vnni_blocks<4>(std::make_index_sequence<kMaxRowsVnni>());
constexpr auto kBlocks8Vnni = vnni_blocks<8>(std::make_index_sequence<kMaxRowsVnni>());

// The activation block for a group: the largest of 32, 16, 8 dividing it (0: none).
int64_t act_block(int64_t group) {
  for (int64_t a : {32, 16, 8})
    if (group % a == 0) return a;
  return 0;
}

using BlockFn = void (*)(const float*, int64_t, const float*, const uint8_t*, const float*, const float*,
                         const float*, int64_t, int64_t, float*, int64_t, int64_t, int64_t);
// The block kernel for each row count of a tile, [rows] for 1 .. N ([0] unused).
template <int BITS, size_t... R>
constexpr std::array<BlockFn, sizeof...(R) + 1> avx512_blocks(std::index_sequence<R...>) {
  return {nullptr, block_rows<R + 1, BITS>...};
}
template <int BITS, size_t... R>
constexpr std::array<BlockFn, sizeof...(R) + 1> avx2_blocks(std::index_sequence<R...>) {
  return {nullptr, block_rows_avx2<R + 1, BITS>...};
}
constexpr auto kBlocks4 = avx512_blocks<4>(std::make_index_sequence<kMaxRows>());
constexpr auto kBlocks8 = avx512_blocks<8>(std::make_index_sequence<kMaxRows>());
constexpr auto kBlocks4Avx2 = avx2_blocks<4>(std::make_index_sequence<kMaxRows2>());
constexpr auto kBlocks8Avx2 = avx2_blocks<8>(std::make_index_sequence<kMaxRows2>());

int best_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") ? 3 : 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

std::atomic<int> chosen_isa{-1};

// Chooses the kernels' level (at most the CPU's best); returns the level before.
int64_t set_isa(int64_t level) {
  TORCH_CHECK(level >= 0 && level <= best_isa(), "ISA level ", level, " not available: this CPU's best is ", best_isa());
  const int before = chosen_isa.exchange(static_cast<int>(level));
  return before < 0 ? best_isa() : before;
}

at::Tensor wq_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& biases,
                   int64_t bits, int64_t group_size, int64_t out_features, const std::optional<at::Tensor>& bias) {
  const int level = qc_isa();
  TORCH_CHECK(level >= 1, "qc_cpu::wq_gemm needs a CPU with AVX-512 (F, BW) or AVX2 and FMA");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), per_k = bits == 4 ? 2 : 1;
  const bool vnni = packed.dim() == 3 && packed.size(2) == 64;
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && K % group_size == 0, "group size ", group_size, " must divide K = ", K,
              " and be a multiple of 4");
  if (vnni) {
    TORCH_CHECK(level >= 3, "VNNI-packed weights need a CPU with AVX512-VNNI (chosen ISA level ", level, ")");
    TORCH_CHECK(act_block(group_size) > 0, "VNNI-packed weights need a group size that is a multiple of 8, got ", group_size);
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.size(1) * 64 == K * 16 / per_k && packed.is_contiguous(),
                "VNNI-packed weights must be uint8 [N/16, K/", bits == 4 ? 8 : 4, ", 64] for K = ", K, ", got ", packed.sizes());
  } else {
    TORCH_CHECK(packed.scalar_type() == (bits == 4 ? at::kByte : at::kChar) && packed.dim() == 3 && packed.size(1) * per_k == K &&
                packed.size(2) == 16 && packed.is_contiguous(), "packed must be ", bits == 4 ? "uint8 [N/16, K/2, 16]" : "int8 [N/16, K, 16]",
                " for K = ", K, ", got ", packed.sizes());
  }
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &biases})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == NB &&
                t->size(1) == G && t->size(2) == 16, "scales and biases must be contiguous fp32 [N/16, K/G, 16]");
  TORCH_CHECK(out_features <= NB * 16 && out_features > (NB - 1) * 16, "out_features ", out_features, " vs ", NB, " blocks");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features, "bias must be fp32 [N]");
  at::Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(packed.data_ptr());
  const float *scp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  const float* biasp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t block_bytes = K * 16 / per_k, block_params = G * 16;
  if (vnni) {
    const int64_t A = act_block(group_size);
    const QuantizedRows qr = quantize_rows(xp, M, K, A, group_size);
    const VnniFn* blocks = (bits == 4 ? kBlocks4Vnni : kBlocks8Vnni).data();
    at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t nb = b0; nb < b1; ++nb) {
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsVnni) {
          const int64_t rows = M - m0 < kMaxRowsVnni ? M - m0 : kMaxRowsVnni;
          blocks[rows](qr.q.data() + m0 * K, qr.sx.data() + m0 * (K / A), qr.xs.data() + m0 * G, wp + nb * block_bytes,
                       scp + nb * block_params, bp + nb * block_params, biasp, K, group_size, A, yp + m0 * out_features,
                       out_features, nb * 16, out_features);
        }
      }
    });
    return y;
  }
  std::vector<float> sumx(M * G);  // per row and group: the sum of the activations (zero-point term)
  for (int64_t r = 0; r < M * G; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < group_size; ++k) acc += xp[r * group_size + k];
    sumx[r] = acc;
  }
  const BlockFn* blocks = level >= 2 ? (bits == 4 ? kBlocks4 : kBlocks8).data()
                                      : (bits == 4 ? kBlocks4Avx2 : kBlocks8Avx2).data();
  const int64_t tile = level >= 2 ? kMaxRows : kMaxRows2;
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t rows = M - m0 < tile ? M - m0 : tile;
        blocks[rows](xp + m0 * K, K, sumx.data() + m0 * G, wp + nb * block_bytes, scp + nb * block_params,
                     bp + nb * block_params, biasp, K, group_size, yp + m0 * out_features, out_features, nb * 16, out_features);
      }
    }
  });
  return y;
}

// (q - 8 [int4] - zero) * scale as q * scale + offset in fp32, then dtype: codegen/ops.py's
// _dequantize, op for op (the same results bit for bit).
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      int64_t bits, at::ScalarType dtype) {
  const at::Tensor q = bits == 4 ? at::stack({qweight.bitwise_and(0xF), qweight.bitwise_right_shift(4)}, -1).to(at::kFloat)
                                 : qweight.to(at::kFloat);
  const int64_t N = scales.size(0), groups = scales.size(1);
  const at::Tensor s = scales.to(at::kFloat);
  const at::Tensor shift = (zeros ? zeros->to(at::kFloat) : at::zeros_like(s)) + (bits == 4 ? 8.0 : 0.0);
  return at::addcmul((shift * s).neg().unsqueeze(-1), q.reshape({N, groups, -1}), s.unsqueeze(-1)).reshape({N, -1}).to(dtype);
}

// qc::wq_linear_native for any number of rows, without a host-side branch: wq_gemm for up to
// max_native_rows rows (fp32), else dequantize + one GEMM in bf16 (dense_bf16) or fp32.
at::Tensor wq_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& block_scales,
                     const at::Tensor& block_biases, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                     int64_t max_native_rows, bool dense_bf16) {
  const int64_t K = x.size(-1), N = qweight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const at::Tensor x2 = x.reshape({-1, K});
  if (x2.size(0) <= max_native_rows) {
    const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
    return wq_gemm(x2.to(at::kFloat).contiguous(), packed, block_scales, block_biases, bits, K / scales.size(1), N, b)
        .to(x.scalar_type()).reshape(out_shape);
  }
  const at::ScalarType dt = dense_bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor y = at::linear(x2.to(dt), dequantize(qweight, scales, zeros, bits, dt)).to(x.scalar_type()).reshape(out_shape);
  return bias ? y + bias->to(x.scalar_type()) : y;
}

}  // namespace

int qc_isa() {
  const int level = chosen_isa.load();
  return level >= 0 ? level : best_isa();
}

TORCH_LIBRARY(qc_cpu, m) {
  m.def("set_isa(int level) -> int", &set_isa);
  m.def("wq_gemm(Tensor x, Tensor packed, Tensor scales, Tensor biases, int bits, int group_size, int out_features, Tensor? bias) -> Tensor");
  m.def("wq_linear(Tensor x, Tensor packed, Tensor block_scales, Tensor block_biases, Tensor qweight, Tensor scales, "
        "Tensor? zeros, Tensor? bias, int bits, int max_native_rows, bool dense_bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(qc_cpu, CPU, m) {
  m.impl("wq_gemm", &wq_gemm);
  m.impl("wq_linear", &wq_linear);
}
