// qc_cpu::sample_rows: one token per row of logits [S, V] (fp32), the native form of the batched
// sampler (runtime/sampling.py: sampling_probs and sample_batch are its reference):
// temperature, top-k (ties with the k-th logit kept), top-p (the smallest set of most likely
// tokens whose mass reaches top_p, ties with its least likely member kept), then inverse-CDF
// sampling with the row's uniform draw u in [0, 1): the first token whose cumulative weight
// exceeds u times the kept mass.
//
// Weights e_j = exp((x_j - max) / T) are not normalized: masses compare with top_p * sum(e).
// Per row: a max pass; for top-k, a pass selecting the logits near the max (widening until k are
// there) and nth_element on those; an exp pass; for top-p, candidate passes (tokens weighing at
// least 1e-2, 1e-4, 1e-7 of the most likely one, then all, until their mass reaches top_p) and a
// sort of the candidates; then one pass to the draw. Rows run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qc_avx512.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr float kLevels[] = {1e-2f, 1e-4f, 1e-7f, 0.f};
// top-k looks among the logits within margin * T of the max first (weights above e^-margin)
constexpr float kTopKMargins[] = {8.f, 16.f, 32.f, std::numeric_limits<float>::infinity()};

// Copies the values of v[0:n] that are >= lo to out (in order); returns how many.
QC_AVX512 int64_t select_at_least(const float* v, int64_t n, float lo, float* out) {
  const __m512 vlo = _mm512_set1_ps(lo);
  int64_t j = 0, c = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_loadu_ps(v + j);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, vlo, _CMP_GE_OQ);
    _mm512_mask_compressstoreu_ps(out + c, keep, x);
    c += __builtin_popcount(keep);
  }
  for (; j < n; ++j)
    if (v[j] >= lo) out[c++] = v[j];
  return c;
}

QC_AVX512 int64_t sample_row(const float* x, int64_t V, float temperature, int64_t top_k, float top_p, float u,
                             std::vector<float>& e, std::vector<float>& buf) {
  const float inf = std::numeric_limits<float>::infinity();
  int64_t j = 0;
  __m512 mv = _mm512_set1_ps(-inf);
  for (; j + 16 <= V; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
  float m = _mm512_reduce_max_ps(mv);
  for (; j < V; ++j) m = std::max(m, x[j]);

  float kth = -inf;
  if (top_k > 0 && top_k < V) {  // the k-th largest logit, among those within a margin of the max when enough are
    buf.resize(V);
    for (const float margin : kTopKMargins) {
      const int64_t n = select_at_least(x, V, m - margin * temperature, buf.data());
      if (n >= top_k || margin == inf) {
        std::nth_element(buf.begin(), buf.begin() + (top_k - 1), buf.begin() + n, std::greater<float>());
        kth = buf[top_k - 1];
        break;
      }
    }
  }

  e.resize(V);
  const __m512 vm = _mm512_set1_ps(m), vk = _mm512_set1_ps(kth), vinv = _mm512_set1_ps(1.f / temperature),
               vfloor = _mm512_set1_ps(-87.f);
  __m512 zs = _mm512_setzero_ps();
  for (j = 0; j + 16 <= V; j += 16) {
    const __m512 xv = _mm512_loadu_ps(x + j);
    const __m512 z = _mm512_mul_ps(_mm512_sub_ps(xv, vm), vinv);
    // weights below e^-87 are 0, not exp512's clamped 1.6e-38: such tokens are never drawn
    const __mmask16 keep = _mm512_cmp_ps_mask(xv, vk, _CMP_GE_OQ) & _mm512_cmp_ps_mask(z, vfloor, _CMP_GE_OQ);
    const __m512 w = _mm512_maskz_mov_ps(keep, exp512(z));
    _mm512_storeu_ps(e.data() + j, w);
    zs = _mm512_add_ps(zs, w);
  }
  double total = _mm512_reduce_add_ps(zs);
  for (; j < V; ++j) {
    const float z = (x[j] - m) / temperature;
    e[j] = x[j] >= kth && z >= -87.f ? std::exp(z) : 0.f;
    total += e[j];
  }

  float threshold = std::numeric_limits<float>::min();  // kept: weights at least this
  if (top_p < 1.f) {
    const double want = static_cast<double>(top_p) * total;
    for (const float level : kLevels) {
      const float floor_ = std::max(level, std::numeric_limits<float>::min());
      buf.resize(V);
      const int64_t n_cand = select_at_least(e.data(), V, floor_, buf.data());
      buf.resize(n_cand);
      double mass = 0;
      for (const float w : buf) mass += w;
      if (level > 0.f && mass < want) continue;
      std::sort(buf.begin(), buf.end(), std::greater<float>());
      double before = 0;  // mass of the tokens before the n-th
      size_t n = 0;
      while (n < buf.size() && before < want) before += buf[n++];
      if (level > 0.f && before < want) continue;  // summation order left the candidates just short
      threshold = buf[std::max<size_t>(n, 1) - 1];
      break;
    }
  }

  double kept = 0;
  for (j = 0; j < V; ++j)
    if (e[j] >= threshold) kept += e[j];
  const double target = static_cast<double>(u) * kept;
  double acc = 0;
  int64_t last = 0;
  for (j = 0; j < V; ++j)
    if (e[j] >= threshold) {
      acc += e[j];
      last = j;
      if (acc > target) return j;
    }
  return last;  // u * kept rounded up to kept: the last token with weight
}

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                       const at::Tensor& top_p, const at::Tensor& u) {
  TORCH_CHECK(qc_isa() >= 2, "sample_rows needs a CPU with AVX-512 (F, BW)");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "sample_rows: logits must be a contiguous fp32 [S, V] tensor");
  const int64_t S = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "sample_rows: empty vocabulary");
  for (const auto* t : {&temperature, &top_p, &u})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == S && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "sample_rows: temperature, top_p and u must be contiguous fp32 [S] tensors");
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == S && top_k.scalar_type() == at::kLong && top_k.is_contiguous(),
              "sample_rows: top_k must be a contiguous int64 [S] tensor");
  auto out = at::empty({S}, logits.options().dtype(at::kLong));
  const float *x = logits.data_ptr<float>(), *t = temperature.data_ptr<float>(), *p = top_p.data_ptr<float>(),
              *r = u.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(t[s] > 0.f && p[s] > 0.f && p[s] <= 1.f && r[s] >= 0.f && r[s] < 1.f,
                "sample_rows: row ", s, " needs temperature > 0, top_p in (0, 1], u in [0, 1)");
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> e, buf;
    for (int64_t s = s0; s < s1; ++s) o[s] = sample_row(x + s * V, V, t[s], k[s], p[s], r[s], e, buf);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qc_cpu, m) {
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(qc_cpu, CPU, m) { m.impl("sample_rows", &sample_rows); }
