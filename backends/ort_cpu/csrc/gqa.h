// The attention core of dmpq's `ai.dmpq.GroupQueryAttention` (the op is in dmpq_moe.cc): a block of consecutive
// query rows of the query heads that share one KV head, against that KV head's rows where they lie in the cache.
//
// Why its own loop: onnxruntime's CPU GroupQueryAttention computes each query head on its own, so a KV head's
// rows are read once per query head of its group (8 times for Qwen3-30B-A3B's 32 query / 4 KV heads), and a
// decode step is a matrix-vector product per head. Here each key row is loaded once for the whole group
// (kRows x kGroup independent sums in registers), and the keys and values go by in tiles of kTile rows: every
// query row of the block takes a tile while it is in cache, with the softmax kept online (a running maximum and
// sum per query head, the output rescaled when the maximum grows), so a prompt's rows do not each stream the
// whole cache from memory. Work per query row: O(positions x heads x head_dim) multiply-adds; the KV rows are read
// from memory about once per block of rows.
//
// Three paths with the same structure: AVX-512 values' sums (head_dim a multiple of 16), AVX2 + FMA (a multiple of 8)
// and portable C++ (any head_dim); they agree to float rounding (their sums and exponentials are ordered
// differently).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace dmpq_gqa {

// key rows per tile: a block of several query rows takes 32 (16 KB of keys and as much of values at head_dim 128:
// in L1 while every row of the block takes them), a lone row (a decode step) 256 (nothing to reuse: fewer rescales)
constexpr int64_t kTile = 256;
constexpr int64_t kBlockTile = 32;
constexpr float kFloor = -87.f;  // e^x below this is taken as 0 (it would be subnormal: see ExpSum)

// A block of `rows` consecutive query rows of one KV head's group of query heads.
struct Rows {
  const float* q;      // the first row's group of query heads: [group][head_dim], rows `q_stride` floats apart
  int64_t q_stride;
  const float* K;      // [n][head_dim]: the KV head's key rows, row u at K + u * head_dim
  const float* V;      // [n][head_dim]
  int64_t rows;
  int64_t n0;          // keys the first row attends, [0, n0); row i attends [0, n0 + i) (causal)
  const float* bias;   // the first row's bias over the keys (added after scaling), rows `bias_stride` apart; or null
  int64_t bias_stride;
  float* out;          // like q
  float* scratch;      // ScratchFloats(rows, group, head_dim) floats
  const float* Kt = nullptr;  // the keys transposed, [head_dim][ldt] (TransposeKeys), or null: scores by rows of K
  int64_t ldt = 0;
};

// Keys [n][hd] transposed into kt [hd][ldt] (ldt >= n, a multiple of kBlockTile; the columns from n on zero), so
// that a tile's scores are products vectorized over keys (TileScores), not a dot product with a horizontal sum each.
inline void TransposeKeys(const float* K, int64_t n, int hd, int64_t ldt, float* kt) {
  for (int64_t u0 = 0; u0 < ldt; u0 += 16) {
    const int64_t u1 = std::min(n, u0 + 16);
    for (int d = 0; d < hd; ++d) {
      float* dst = kt + static_cast<size_t>(d) * ldt + u0;
      int64_t u = u0;
      for (; u < u1; ++u) dst[u - u0] = K[static_cast<size_t>(u) * hd + d];
      for (; u < u0 + 16; ++u) dst[u - u0] = 0.f;
    }
  }
}

inline size_t ScratchFloats(int64_t rows, int group, int hd) {
  return static_cast<size_t>(group) * (kTile + rows * (2 + hd));  // kTile >= kBlockTile
}

// The tile operations, portable.
struct Portable {
  // s[j * n + u] = q_j . K_u * scale + bias[u], for the group's heads j and keys u < n
  static void Scores(const float* q, int group, const float* K, int hd, int64_t n, float scale, const float* bias,
                     float* s) {
    for (int j = 0; j < group; ++j)
      for (int64_t u = 0; u < n; ++u) {
        float acc = 0.f;
        for (int d = 0; d < hd; ++d) acc += q[static_cast<size_t>(j) * hd + d] * K[static_cast<size_t>(u) * hd + d];
        s[static_cast<size_t>(j) * n + u] = acc * scale + (bias ? bias[u] : 0.f);
      }
  }
  // the kBlockTile dot products of keys [u0, u0 + kBlockTile) for `count` (<= 4) query vectors, unscaled, into
  // s + c * kBlockTile
  static void TileScores(const float* const* q, int count, const float* Kt, int64_t ldt, int64_t u0, int hd,
                         float* s) {
    for (int c = 0; c < count; ++c)
      for (int64_t u = 0; u < kBlockTile; ++u) {
        float acc = 0.f;
        for (int d = 0; d < hd; ++d) acc += q[c][d] * Kt[static_cast<size_t>(d) * ldt + u0 + u];
        s[c * kBlockTile + u] = acc;
      }
  }
  static float Max(const float* s, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t u = 0; u < n; ++u) m = std::max(m, s[u]);
    return m;
  }
  // s = e^(s - m), 0 below kFloor; returns the sum
  static float ExpSum(float* s, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t u = 0; u < n; ++u) sum += (s[u] = s[u] - m < kFloor ? 0.f : std::exp(s[u] - m));
    return sum;
  }
  static void Scale(float* o, int hd, float f) {
    for (int d = 0; d < hd; ++d) o[d] *= f;
  }
  // o += sum_u p[u] V[u]
  static void MixAdd(const float* p, const float* V, int hd, int64_t n, float* o) {
    for (int64_t u = 0; u < n; ++u)
      for (int d = 0; d < hd; ++d) o[d] += p[u] * V[static_cast<size_t>(u) * hd + d];
  }
};

#define DMPQ_GQA_AVX2 __attribute__((target("avx2,fma")))

DMPQ_GQA_AVX2 inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

DMPQ_GQA_AVX2 inline float HMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lane k of the result is the sum of a[k]'s eight lanes (k < 8): pairwise horizontal adds, then the halves.
DMPQ_GQA_AVX2 inline __m256 Reduce8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // a0..a3: low, high
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0, eight at once: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
// (relative error under 2e-7 there), 2^n put in the exponent bits. Below kFloor (where e^x leaves float's normal
// range) it returns 0: a subnormal weight would make every product it enters take the CPU's slow subnormal path
// (measured: a 48-layer decode step 2.5x slower once one cached row dominated the others).
DMPQ_GQA_AVX2 inline __m256 ExpNonPositive(__m256 x) {
  const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(kFloor), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), normal);
}

// Scores of key rows [u, u + kRows) for kGroup query heads (q's heads at q + j * hd, their scores at
// s + j * n): kRows x kGroup = 8 independent sums, so the multiply-adds do not wait on each other.
template <int kRows, int kGroup>
DMPQ_GQA_AVX2 inline void ScoreRows(const float* q, const float* K, int hd, int64_t u, int64_t n, float scale,
                                    const float* bias, float* s) {
  __m256 acc[kRows][kGroup];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kGroup; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int d = 0; d < hd; d += 8) {
    for (int i = 0; i < kRows; ++i) {
      const __m256 k = _mm256_loadu_ps(K + static_cast<size_t>(u + i) * hd + d);
      for (int j = 0; j < kGroup; ++j)
        acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + static_cast<size_t>(j) * hd + d), k, acc[i][j]);
    }
  }
  if constexpr (kRows * kGroup == 8) {  // the eight sums at once: a transposing reduction, not eight
    alignas(32) float sums[8];
    _mm256_store_ps(sums, _mm256_mul_ps(Reduce8(&acc[0][0]), _mm256_set1_ps(scale)));
    for (int i = 0; i < kRows; ++i) {
      const float b = bias ? bias[u + i] : 0.f;
      for (int j = 0; j < kGroup; ++j) s[static_cast<size_t>(j) * n + u + i] = sums[i * kGroup + j] + b;
    }
  } else {
    for (int i = 0; i < kRows; ++i) {
      const float b = bias ? bias[u + i] : 0.f;
      for (int j = 0; j < kGroup; ++j) s[static_cast<size_t>(j) * n + u + i] = HSum(acc[i][j]) * scale + b;
    }
  }
}

template <int kGroup>
DMPQ_GQA_AVX2 void GroupScores(const float* q, const float* K, int hd, int64_t n, float scale, const float* bias,
                               float* s) {
  constexpr int kRows = kGroup >= 8 ? 1 : 8 / kGroup;
  int64_t u = 0;
  for (; u + kRows <= n; u += kRows) ScoreRows<kRows, kGroup>(q, K, hd, u, n, scale, bias, s);
  for (; u < n; ++u) ScoreRows<1, kGroup>(q, K, hd, u, n, scale, bias, s);
}

// o[d0, d0 + 8 kRegs) += sum_u p[u] V[u][d0, ...): kRegs independent sums over the rows.
template <int kRegs>
DMPQ_GQA_AVX2 inline void MixRegs(const float* p, const float* V, int hd, int d0, int64_t n, float* o) {
  __m256 acc[kRegs];
  for (int w = 0; w < kRegs; ++w) acc[w] = _mm256_loadu_ps(o + d0 + 8 * w);
  for (int64_t u = 0; u < n; ++u) {
    const __m256 pu = _mm256_set1_ps(p[u]);
    const float* row = V + static_cast<size_t>(u) * hd + d0;
    for (int w = 0; w < kRegs; ++w) acc[w] = _mm256_fmadd_ps(pu, _mm256_loadu_ps(row + 8 * w), acc[w]);
  }
  for (int w = 0; w < kRegs; ++w) _mm256_storeu_ps(o + d0 + 8 * w, acc[w]);
}

// The tile operations, AVX2 + FMA; head_dim must be a multiple of 8.
struct Avx2 {
  DMPQ_GQA_AVX2 static void Scores(const float* q, int group, const float* K, int hd, int64_t n, float scale,
                                   const float* bias, float* s) {
    switch (group) {
      case 1: GroupScores<1>(q, K, hd, n, scale, bias, s); break;
      case 2: GroupScores<2>(q, K, hd, n, scale, bias, s); break;
      case 4: GroupScores<4>(q, K, hd, n, scale, bias, s); break;
      case 8: GroupScores<8>(q, K, hd, n, scale, bias, s); break;
      default:  // other group sizes: a head at a time
        for (int j = 0; j < group; ++j)
          GroupScores<1>(q + static_cast<size_t>(j) * hd, K, hd, n, scale, bias, s + static_cast<size_t>(j) * n);
    }
  }
  DMPQ_GQA_AVX2 static void TileScores(const float* const* q, int count, const float* Kt, int64_t ldt, int64_t u0,
                                       int hd, float* s) {
    static_assert(kBlockTile == 32, "four 8-lane registers a tile");
    for (int c = 0; c < count; c += 2) {
      const int pair = std::min(2, count - c);
      __m256 acc[2][4];
      for (int i = 0; i < 2; ++i)
        for (int w = 0; w < 4; ++w) acc[i][w] = _mm256_setzero_ps();
      for (int d = 0; d < hd; ++d) {
        const float* row = Kt + static_cast<size_t>(d) * ldt + u0;
        const __m256 k0 = _mm256_loadu_ps(row), k1 = _mm256_loadu_ps(row + 8), k2 = _mm256_loadu_ps(row + 16),
                     k3 = _mm256_loadu_ps(row + 24);
        for (int i = 0; i < pair; ++i) {
          const __m256 b = _mm256_broadcast_ss(q[c + i] + d);
          acc[i][0] = _mm256_fmadd_ps(b, k0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(b, k1, acc[i][1]);
          acc[i][2] = _mm256_fmadd_ps(b, k2, acc[i][2]);
          acc[i][3] = _mm256_fmadd_ps(b, k3, acc[i][3]);
        }
      }
      for (int i = 0; i < pair; ++i)
        for (int w = 0; w < 4; ++w) _mm256_storeu_ps(s + (c + i) * kBlockTile + 8 * w, acc[i][w]);
    }
  }
  DMPQ_GQA_AVX2 static float Max(const float* s, int64_t n) {
    __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t u = 0;
    for (; u + 8 <= n; u += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + u));
    float m = HMax(m8);
    for (; u < n; ++u) m = std::max(m, s[u]);
    return m;
  }
  DMPQ_GQA_AVX2 static float ExpSum(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t u = 0;
    for (; u + 8 <= n; u += 8) {
      const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(s + u), mv));
      _mm256_storeu_ps(s + u, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = HSum(sum8);
    if (u < n) {  // the last 1-7, as eight lanes with the unused ones at -inf
      const int64_t left = n - u;
      alignas(32) float t[8];
      for (int i = 0; i < 8; ++i) t[i] = i < left ? s[u + i] - m : -std::numeric_limits<float>::infinity();
      _mm256_store_ps(t, ExpNonPositive(_mm256_load_ps(t)));
      for (int i = 0; i < left; ++i) sum += (s[u + i] = t[i]);
    }
    return sum;
  }
  DMPQ_GQA_AVX2 static void Scale(float* o, int hd, float f) {
    const __m256 fv = _mm256_set1_ps(f);
    for (int d = 0; d < hd; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), fv));
  }
  DMPQ_GQA_AVX2 static void MixAdd(const float* p, const float* V, int hd, int64_t n, float* o) {
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) MixRegs<8>(p, V, hd, d0, n, o);
    switch ((hd - d0) / 8) {
      case 1: MixRegs<1>(p, V, hd, d0, n, o); break;
      case 2: MixRegs<2>(p, V, hd, d0, n, o); break;
      case 3: MixRegs<3>(p, V, hd, d0, n, o); break;
      case 4: MixRegs<4>(p, V, hd, d0, n, o); break;
      case 5: MixRegs<5>(p, V, hd, d0, n, o); break;
      case 6: MixRegs<6>(p, V, hd, d0, n, o); break;
      case 7: MixRegs<7>(p, V, hd, d0, n, o); break;
      default: break;
    }
  }
};

#define DMPQ_GQA_AVX512 __attribute__((target("avx512f,avx2,fma")))

// The AVX-512 form of the values' sum (16 lanes: head_dim 128 in one pass over the rows, where AVX2 takes two).
template <int kRegs>
DMPQ_GQA_AVX512 inline void MixRegs512(const float* p, const float* V, int hd, int d0, int64_t n, float* o) {
  __m512 acc[kRegs];
  for (int w = 0; w < kRegs; ++w) acc[w] = _mm512_loadu_ps(o + d0 + 16 * w);
  for (int64_t u = 0; u < n; ++u) {
    const __m512 pu = _mm512_set1_ps(p[u]);
    const float* row = V + static_cast<size_t>(u) * hd + d0;
    for (int w = 0; w < kRegs; ++w) acc[w] = _mm512_fmadd_ps(pu, _mm512_loadu_ps(row + 16 * w), acc[w]);
  }
  for (int w = 0; w < kRegs; ++w) _mm512_storeu_ps(o + d0 + 16 * w, acc[w]);
}

// The tile operations with the values' sum in AVX-512 (the scores and the softmax are Avx2's: 16-lane scores
// measured no faster); head_dim must be a multiple of 16.
struct Avx512 : Avx2 {
  DMPQ_GQA_AVX512 static void TileScores(const float* const* q, int count, const float* Kt, int64_t ldt, int64_t u0,
                                         int hd, float* s) {
    static_assert(kBlockTile == 32, "two 16-lane registers a tile");
    __m512 acc[4][2];
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int d = 0; d < hd; ++d) {
      const float* row = Kt + static_cast<size_t>(d) * ldt + u0;
      const __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16);
      for (int i = 0; i < count; ++i) {
        const __m512 b = _mm512_set1_ps(q[i][d]);
        acc[i][0] = _mm512_fmadd_ps(b, k0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(b, k1, acc[i][1]);
      }
    }
    for (int i = 0; i < count; ++i) {
      _mm512_storeu_ps(s + i * kBlockTile, acc[i][0]);
      _mm512_storeu_ps(s + i * kBlockTile + 16, acc[i][1]);
    }
  }
  DMPQ_GQA_AVX512 static void MixAdd(const float* p, const float* V, int hd, int64_t n, float* o) {
    int d0 = 0;
    for (; d0 + 128 <= hd; d0 += 128) MixRegs512<8>(p, V, hd, d0, n, o);
    switch ((hd - d0) / 16) {
      case 1: MixRegs512<1>(p, V, hd, d0, n, o); break;
      case 2: MixRegs512<2>(p, V, hd, d0, n, o); break;
      case 3: MixRegs512<3>(p, V, hd, d0, n, o); break;
      case 4: MixRegs512<4>(p, V, hd, d0, n, o); break;
      case 5: MixRegs512<5>(p, V, hd, d0, n, o); break;
      case 6: MixRegs512<6>(p, V, hd, d0, n, o); break;
      case 7: MixRegs512<7>(p, V, hd, d0, n, o); break;
      default: break;
    }
  }
};

// Attention of a block of query rows (Rows), tile by tile over the keys, the softmax online: per query head a
// running maximum m and sum l of e^(s - m), the output's running sum rescaled by e^(m_old - m_new) when m grows.
// A key every score of which is at the bias's floor (the lowest float) weighs as much as any other such key until
// a higher score comes, so a row that may attend nothing averages what it was given, as a one-pass softmax does.
template <class Ops>
void Attend(const Rows& r, int group, int hd, float scale) {
  const int64_t members = r.rows * group;  // (row, head) pairs
  float* s = r.scratch;                     // [group][tile]
  float* m = s + static_cast<size_t>(group) * kTile;
  float* l = m + members;
  float* acc = l + members;                 // [members][hd]
  std::fill(m, m + members, -std::numeric_limits<float>::infinity());
  std::fill(l, l + members, 0.f);
  std::fill(acc, acc + members * hd, 0.f);
  const int64_t n_max = r.n0 + r.rows - 1, tile = r.rows > 1 ? kBlockTile : kTile;
  // one (row, head)'s tile: its scores in sj (n of them) into the online softmax and the output
  auto take = [&](int64_t i, int j, float* sj, int64_t n, const float* V) {
    const int64_t at = i * group + j;
    const float top = std::max(m[at], Ops::Max(sj, n));
    const float f = m[at] - top < kFloor ? 0.f : std::exp(m[at] - top);  // 0 on the first tile (m = -inf)
    float* o = acc + static_cast<size_t>(at) * hd;
    if (f != 1.f) Ops::Scale(o, hd, f);
    l[at] = l[at] * f + Ops::ExpSum(sj, n, top);
    Ops::MixAdd(sj, V, hd, n, o);
    m[at] = top;
  };
  for (int64_t u0 = 0; u0 < n_max; u0 += tile) {
    const float* K = r.K + static_cast<size_t>(u0) * hd;
    const float* V = r.V + static_cast<size_t>(u0) * hd;
    if (r.Kt != nullptr && r.rows > 1) {  // scores from the transposed keys, four (row, head) pairs at a time
      int64_t pending[4][2];
      const float* qs[4];
      int count = 0;
      auto flush = [&]() {
        Ops::TileScores(qs, count, r.Kt, r.ldt, u0, hd, s);
        for (int c = 0; c < count; ++c) {
          const int64_t i = pending[c][0], n = std::min(tile, r.n0 + i - u0);
          float* sc = s + c * kBlockTile;
          const float* bias = r.bias ? r.bias + i * r.bias_stride + u0 : nullptr;
          for (int64_t u = 0; u < n; ++u) sc[u] = sc[u] * scale + (bias ? bias[u] : 0.f);
          take(i, static_cast<int>(pending[c][1]), sc, n, V);
        }
        count = 0;
      };
      for (int64_t i = 0; i < r.rows; ++i) {
        if (r.n0 + i <= u0) continue;
        for (int j = 0; j < group; ++j) {
          pending[count][0] = i;
          pending[count][1] = j;
          qs[count++] = r.q + i * r.q_stride + static_cast<size_t>(j) * hd;
          if (count == 4) flush();
        }
      }
      if (count) flush();
      continue;
    }
    for (int64_t i = 0; i < r.rows; ++i) {
      const int64_t n = std::min(tile, r.n0 + i - u0);  // this row's keys in the tile
      if (n <= 0) continue;
      const float* bias = r.bias ? r.bias + i * r.bias_stride + u0 : nullptr;
      Ops::Scores(r.q + i * r.q_stride, group, K, hd, n, scale, bias, s);
      for (int j = 0; j < group; ++j) take(i, j, s + static_cast<size_t>(j) * n, n, V);
    }
  }
  for (int64_t i = 0; i < r.rows; ++i)
    for (int j = 0; j < group; ++j) {
      const int64_t at = i * group + j;
      const float inv = 1.f / l[at];
      const float* o = acc + static_cast<size_t>(at) * hd;
      float* dst = r.out + i * r.q_stride + static_cast<size_t>(j) * hd;
      for (int d = 0; d < hd; ++d) dst[d] = o[d] * inv;
    }
}

}  // namespace dmpq_gqa
