// qc_cpu::paged_decode: decode attention (one query per sequence) straight from the paged KV
// cache, on x86 CPUs with AVX-512 (F), fp32.
//
//   out[s, h] = softmax(scale * q[s, h] . K[s, F_s:L_s, h / rep]) @ V[s, F_s:L_s, h / rep]
//
// with F_s = max(0, L_s - window) for a sliding window (window > 0), else 0; with softcap > 0 each
// score x becomes softcap * tanh(x / softcap) before the softmax.
// with K and V read in place through the block table (no gathered copy, no mask). One work item
// is a sequence, a KV head and up to kHeads of its query heads: their query vectors stay in
// registers while the keys stream once, and the weighted sum of V keeps their outputs in
// registers. exp: ``exp512`` (qc_avx512.h). Cache layout:
// [layers, 2, blocks, block_size, kv_heads, head_dim] (codegen/attention.py); a quantized cache
// (int8, or fp8 e4m3 stored as bytes) has rows of head_dim codes and a bf16 scale,
// [..., head_dim + 2]: the key's scale multiplies its score, the value's its softmax weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "qc_avx512.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

QC_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
QC_AVX512 inline __m512 load16(const at::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

QC_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// fp8 e4m3 codes, 256x too small: sign and magnitude moved into an fp16's bits (exponent bias 15
// vs 7), exact for normal and subnormal codes alike; Fp8::kUnit folds the 256 into the scale.
struct Fp8 { uint8_t bits; static constexpr float kUnit = 256.f; };
QC_AVX512 inline __m512 load16(const Fp8* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
  const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
  return _mm512_cvtph_ps(_mm256_or_si256(sign, mag));
}

template <typename KV>
constexpr bool kQuantized = std::is_same_v<KV, int8_t> || std::is_same_v<KV, Fp8>;

// a row's multiplier: its bf16 scale after the D codes (quantized caches), else 1
template <int D, typename KV>
inline float row_scale(const KV* row) {
  if constexpr (kQuantized<KV>) {
    uint16_t h;
    std::memcpy(&h, reinterpret_cast<const uint8_t*>(row) + D, 2);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    if constexpr (std::is_same_v<KV, Fp8>) return f * Fp8::kUnit;
    else return f;
  } else {
    return 1.f;
  }
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

template <typename KV>
struct Cache {
  const KV *k, *v;               // this layer's K and V planes
  int64_t block_size, block_stride, token_stride, num_blocks;
};

// R query heads (rows of q, D floats apart) against one KV head over the L cached tokens from ``first``.
template <int D, int R, typename KV>
QC_AVX512 void attend(const float* q, const Cache<KV>& c, int64_t head_off, const int64_t* table, int64_t first,
                      int64_t L, float scale, float softcap, float* scores, float* out) {
  constexpr int C = D / 16;
  __m512 qv[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) qv[r][i] = _mm512_mul_ps(_mm512_loadu_ps(q + r * D + 16 * i), _mm512_set1_ps(scale));
  auto token = [&](const KV* plane, int64_t t) {
    t += first;
    const int64_t blk = table[t / c.block_size];
    TORCH_CHECK(blk >= 0 && blk < c.num_blocks, "qc_cpu::paged_decode: block ", blk, " outside the cache's ", c.num_blocks);
    return plane + blk * c.block_stride + (t % c.block_size) * c.token_stride + head_off;
  };
  for (int64_t t = 0; t < L; ++t) {
    const KV* kp = token(c.k, t);
    __m512 kv[C];
    for (int i = 0; i < C; ++i) kv[i] = load16(kp + 16 * i);
    const float ks = row_scale<D>(kp);
    for (int r = 0; r < R; ++r) {
      __m512 a = _mm512_mul_ps(qv[r][0], kv[0]);
      for (int i = 1; i < C; ++i) a = _mm512_fmadd_ps(qv[r][i], kv[i], a);
      scores[r * L + t] = _mm512_reduce_add_ps(a) * ks;
    }
  }
  if (softcap > 0.f)
    for (int64_t i = 0; i < R * L; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  float inv[R];
  for (int r = 0; r < R; ++r) {  // softmax of row r, in place; its normalization is applied at the end
    float* s = scores + r * L;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < L; t += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(L - t), s + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += 16) {
      const __mmask16 k = tail_mask(L - t);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m));
      _mm512_mask_storeu_ps(s + t, k, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 o[R][C];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) o[r][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const KV* vp = token(c.v, t);
    __m512 vv[C];
    for (int i = 0; i < C; ++i) vv[i] = load16(vp + 16 * i);
    const float vs = row_scale<D>(vp);
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(scores[r * L + t] * vs);
      for (int i = 0; i < C; ++i) o[r][i] = _mm512_fmadd_ps(p, vv[i], o[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) _mm512_storeu_ps(out + r * D + 16 * i, _mm512_mul_ps(o[r][i], _mm512_set1_ps(inv[r])));
}

template <typename KV>
using AttendFn = void (*)(const float*, const Cache<KV>&, int64_t, const int64_t*, int64_t, int64_t, float, float,
                          float*, float*);

// query heads per work item: their query and output vectors fit the 32 vector registers
template <int D>
constexpr int max_heads() { return D == 64 ? 4 : D == 128 ? 2 : 1; }

template <int D, typename KV>
AttendFn<KV> pick(int R) {
  if constexpr (D == 64) {
    constexpr AttendFn<KV> fns[] = {nullptr, attend<64, 1, KV>, attend<64, 2, KV>, attend<64, 3, KV>, attend<64, 4, KV>};
    return fns[R];
  } else if constexpr (D == 128) {
    constexpr AttendFn<KV> fns[] = {nullptr, attend<128, 1, KV>, attend<128, 2, KV>};
    return fns[R];
  } else {
    return attend<D, 1, KV>;
  }
}

// query rows and outputs in Q (fp32 or bf16), staged through fp32 buffers per work item
template <int D, typename Q, typename KV>
void run(const at::Tensor& q, const Cache<KV>& c, int64_t Hkv, int64_t W, const at::Tensor& tables, const at::Tensor& lens,
         double scale, int64_t window, double softcap, at::Tensor& out) {
  const int64_t S = q.size(0), Hq = q.size(1), rep = Hq / Hkv, nb = tables.size(1);
  constexpr int RM = max_heads<D>();
  const int64_t chunks = (rep + RM - 1) / RM;
  const Q* qp = q.data_ptr<Q>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  Q* op = out.data_ptr<Q>();
  int64_t Lmax = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lp[s] >= 1 && lp[s] <= nb * c.block_size, "qc_cpu::paged_decode: sequence ", s, " has length ", lp[s],
                ", its block table holds 1..", nb * c.block_size);
    Lmax = std::max(Lmax, lp[s]);
  }
  at::parallel_for(0, S * Hkv * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(RM * Lmax), qf(RM * D), of(RM * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = i / (Hkv * chunks), h = (i / chunks) % Hkv, h0 = (i % chunks) * RM;
      const int R = static_cast<int>(std::min<int64_t>(RM, rep - h0));
      const int64_t row = (s * Hq + h * rep + h0) * D;
      for (int64_t j = 0; j < R * D; ++j) qf[j] = static_cast<float>(qp[row + j]);
      const int64_t first = window > 0 ? std::max<int64_t>(0, lp[s] - window) : 0;
      pick<D, KV>(R)(qf.data(), c, h * W, tp + s * nb, first, lp[s] - first, static_cast<float>(scale),
                     static_cast<float>(softcap), scores.data(), of.data());
      for (int64_t j = 0; j < R * D; ++j) op[row + j] = static_cast<Q>(of[j]);
    }
  });
}

template <int D>
void dispatch(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer, int64_t Hkv, const at::Tensor& tables,
              const at::Tensor& lens, double scale, int64_t window, double softcap, at::Tensor& out) {
  const int64_t blocks = kv_cache.size(2), bs = kv_cache.size(3), W = kv_cache.size(5), plane = blocks * bs * Hkv * W;
  auto go = [&](auto kv0) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(kv0)>>;
    const KV* base = kv0 + layer * 2 * plane;
    const Cache<KV> c{base, base + plane, bs, bs * Hkv * W, Hkv * W, blocks};
    if (q.scalar_type() == at::kFloat) run<D, float>(q, c, Hkv, W, tables, lens, scale, window, softcap, out);
    else run<D, at::BFloat16>(q, c, Hkv, W, tables, lens, scale, window, softcap, out);
  };
  switch (kv_cache.scalar_type()) {
    case at::kFloat: go(kv_cache.data_ptr<float>()); break;
    case at::kBFloat16: go(kv_cache.data_ptr<at::BFloat16>()); break;
    case at::kChar: go(kv_cache.data_ptr<int8_t>()); break;
    default: go(reinterpret_cast<const Fp8*>(kv_cache.data_ptr()));  // Float8_e4m3fn, checked by the caller
  }
}

at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& kv_cache, int64_t layer, const at::Tensor& block_tables,
                        const at::Tensor& seq_lens, double scale, int64_t window, double softcap) {
  TORCH_CHECK(qc_isa() >= 2, "qc_cpu::paged_decode needs a CPU with AVX-512 (F, BW)");
  const auto f32_or_bf16 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; };
  const bool quantized = kv_cache.scalar_type() == at::kChar || kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(query.dim() == 3 && f32_or_bf16(query) && query.is_contiguous(),
              "query must be contiguous fp32/bf16 [S, H, D], got ", query.scalar_type(), " ", query.sizes());
  TORCH_CHECK(kv_cache.dim() == 6 && (f32_or_bf16(kv_cache) || quantized) && kv_cache.is_contiguous(),
              "kv_cache must be contiguous fp32/bf16/int8/fp8 [layers, 2, blocks, block_size, kv_heads, head_dim (+2)], got ",
              kv_cache.scalar_type(), " ", kv_cache.sizes());
  const int64_t S = query.size(0), Hq = query.size(1), D = query.size(2), Hkv = kv_cache.size(4);
  TORCH_CHECK(kv_cache.size(5) == D + (quantized ? 2 : 0) && Hkv > 0 && Hq % Hkv == 0, "query heads ", Hq, " x ", D, " vs cache heads ", Hkv, " x ",
              kv_cache.size(5));
  TORCH_CHECK(layer >= 0 && layer < kv_cache.size(0), "layer ", layer, " outside the cache's ", kv_cache.size(0));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && block_tables.scalar_type() == at::kLong &&
              block_tables.is_contiguous(), "block_tables must be contiguous int64 [S, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == S && seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(),
              "seq_lens must be contiguous int64 [S]");
  at::Tensor out = at::empty_like(query);
  if (S == 0) return out;
  switch (D) {
    case 16: dispatch<16>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    case 32: dispatch<32>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    case 64: dispatch<64>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    case 96: dispatch<96>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    case 128: dispatch<128>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    case 256: dispatch<256>(query, kv_cache, layer, Hkv, block_tables, seq_lens, scale, window, softcap, out); break;
    default: TORCH_CHECK(false, "head_dim ", D, " not built: 16, 32, 64, 96, 128 or 256");
  }
  return out;
}

// qc::paged_attention without Python on decode steps: one query per sequence (query_start_loc is
// 0, 1, .., S), a query and cache paged_decode takes, AVX-512 -> paged_decode; any other step -> the
// qc::paged_attention op itself, through the dispatcher. What a compiled CPU program calls.
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& kv_cache, int64_t layer,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, int64_t window, double softcap) {
  const int64_t S = seq_lens.size(0);
  const auto dt = query.scalar_type(), kt = kv_cache.scalar_type();
  bool decode = qc_isa() >= 2 && query.dim() == 3 && query.size(0) == S && query_start_loc.dim() == 1 && query_start_loc.numel() == S + 1 &&
                query_start_loc.scalar_type() == at::kLong && query_start_loc.device().is_cpu() &&
                (dt == at::kFloat || dt == at::kBFloat16) &&
                (kt == at::kFloat || kt == at::kBFloat16 || kt == at::kChar || kt == at::kFloat8_e4m3fn);
  switch (decode ? query.size(2) : 0) {
    case 16: case 32: case 64: case 96: case 128: case 256: break;
    default: decode = false;
  }
  if (decode) {
    const at::Tensor starts = query_start_loc.contiguous();
    const int64_t* st = starts.data_ptr<int64_t>();
    for (int64_t i = 0; i <= S && decode; ++i) decode = st[i] == i;
  }
  if (decode)
    return paged_decode(query.contiguous(), kv_cache, layer, block_tables.contiguous(), seq_lens.contiguous(), scale, window,
                        softcap);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qc::paged_attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double, int64_t, double)>();
  return op.call(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qc_cpu, m) {
  m.def("paged_decode(Tensor query, Tensor kv_cache, int layer, Tensor block_tables, Tensor seq_lens, float scale, "
        "int window=0, float softcap=0.) -> Tensor");
  m.def("paged_attention(Tensor query, Tensor kv_cache, int layer, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window=0, float softcap=0.) -> Tensor");
}

TORCH_LIBRARY_IMPL(qc_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_attention", &paged_attention);
}
