// A prototype for benchmarks/bench_kv_dtype.py: one decode step of grouped-query attention that reads the
// KV buffer where it lies, in float16 (F16C widens eight values a load) or float32 (the control: the same
// loop, so a difference between the two is the cache's dtype and not the loop). Not used by artifacts.
//
// Layout as onnxruntime's GroupQueryAttention keeps its buffer: K, V [kv_heads][capacity][head_dim];
// q, out [heads][head_dim]; positions [0, total) are attended (the new token's row already written).
// Each KV head's rows are read once for its group of query heads; KV heads are spread over the threads.
#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace {

template <typename T>
inline __m256 load8(const T* p);
template <>
inline __m256 load8<uint16_t>(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (scores minus their maximum), eight at once: x = n ln2 + r with |r| <= ln2 / 2,
// e^r by its Taylor polynomial to degree 7 (relative error under 2e-7 there), 2^n built in the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this e^x underflows float's normal range
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 split in two parts
  const __m256 rr = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, rr, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Scores of kRows consecutive key rows for the kGroup query heads of one KV head: kRows x kGroup = 8
// independent sums in registers, so the FMAs do not wait on each other (one sum a row was latency-bound).
template <typename T, int kRows, int kGroup>
inline void score_rows(const float* qg, const T* k, int head_dim, int t, int total, float scale, float* s) {
  __m256 acc[kRows][kGroup];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kGroup; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int d = 0; d < head_dim; d += 8) {
    for (int r = 0; r < kRows; ++r) {
      const __m256 kr = load8(k + static_cast<size_t>(t + r) * head_dim + d);
      for (int j = 0; j < kGroup; ++j)
        acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j * head_dim + d), kr, acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kGroup; ++j) s[static_cast<size_t>(j) * total + t + r] = hsum(acc[r][j]) * scale;
}

template <typename T, int kGroup>
void scores_of(const float* qg, const T* k, int head_dim, int total, float scale, float* s) {
  constexpr int kRows = kGroup >= 8 ? 1 : 8 / kGroup;
  int t = 0;
  for (; t + kRows <= total; t += kRows) score_rows<T, kRows, kGroup>(qg, k, head_dim, t, total, scale, s);
  for (; t < total; ++t) score_rows<T, 1, kGroup>(qg, k, head_dim, t, total, scale, s);
}

template <typename T>
int attend(const float* q, const T* K, const T* V, int heads, int kv_heads, int head_dim, int capacity, int total,
           float scale, float* out, float* scores, int threads) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || head_dim % 64 != 0 || total < 1 || total > capacity) return 1;
  const int group = heads / kv_heads;
  if (group != 1 && group != 2 && group != 4 && group != 8) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int kv = 0; kv < kv_heads; ++kv) {
    const T* k = K + static_cast<size_t>(kv) * capacity * head_dim;
    const T* v = V + static_cast<size_t>(kv) * capacity * head_dim;
    const float* qg = q + static_cast<size_t>(kv) * group * head_dim;
    float* s = scores + static_cast<size_t>(kv) * group * total;
    switch (group) {
      case 1: scores_of<T, 1>(qg, k, head_dim, total, scale, s); break;
      case 2: scores_of<T, 2>(qg, k, head_dim, total, scale, s); break;
      case 4: scores_of<T, 4>(qg, k, head_dim, total, scale, s); break;
      default: scores_of<T, 8>(qg, k, head_dim, total, scale, s); break;
    }
    for (int j = 0; j < group; ++j) {  // softmax of each query head's row
      float* sj = s + static_cast<size_t>(j) * total;
      float m = sj[0];
      for (int u = 1; u < total; ++u) m = sj[u] > m ? sj[u] : m;
      const __m256 mv = _mm256_set1_ps(m);
      __m256 sum8 = _mm256_setzero_ps();
      int u = 0;
      for (; u + 8 <= total; u += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sj + u), mv));
        _mm256_storeu_ps(sj + u, e);
        sum8 = _mm256_add_ps(sum8, e);
      }
      float sum = hsum(sum8);
      for (; u < total; ++u) sum += (sj[u] = std::exp(sj[u] - m));
      const float inv = 1.f / sum;
      for (u = 0; u < total; ++u) sj[u] *= inv;
    }
    // out = p V, 64 outputs (eight registers) a pass: eight independent sums over the rows
    for (int j = 0; j < group; ++j) {
      const float* pj = s + static_cast<size_t>(j) * total;
      float* o = out + (static_cast<size_t>(kv) * group + j) * head_dim;
      for (int d = 0; d < head_dim; d += 64) {
        __m256 acc[8];
        for (int w = 0; w < 8; ++w) acc[w] = _mm256_setzero_ps();
        for (int u = 0; u < total; ++u) {
          const __m256 p = _mm256_set1_ps(pj[u]);
          const T* row = v + static_cast<size_t>(u) * head_dim + d;
          for (int w = 0; w < 8; ++w) acc[w] = _mm256_fmadd_ps(p, load8(row + 8 * w), acc[w]);
        }
        for (int w = 0; w < 8; ++w) _mm256_storeu_ps(o + d + 8 * w, acc[w]);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// Returns 0, or 1 for shapes the prototype does not take (head_dim a multiple of 64, 1/2/4/8 query heads a KV
// head); it then writes nothing.
__attribute__((visibility("default"))) int kv_attention_f16(const float* q, const uint16_t* K, const uint16_t* V,
                                                            int heads, int kv_heads, int head_dim, int capacity,
                                                            int total, float scale, float* out, float* scores,
                                                            int threads) {
  return attend(q, K, V, heads, kv_heads, head_dim, capacity, total, scale, out, scores, threads);
}

__attribute__((visibility("default"))) int kv_attention_f32(const float* q, const float* K, const float* V, int heads,
                                                            int kv_heads, int head_dim, int capacity, int total,
                                                            float scale, float* out, float* scores, int threads) {
  return attend(q, K, V, heads, kv_heads, head_dim, capacity, total, scale, out, scores, threads);
}
}
