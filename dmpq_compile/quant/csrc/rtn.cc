// Group-wise affine round-to-nearest in one pass per group: the scale and zero point of each group, its codes,
// and (optionally) the dequantized weights, the same operations in the same order as dmpq_compile/quant/rtn.py
// (affine_params, round_scales, quantize_codes, then (q - zero) * scale), so every value is bit-identical to
// that torch path (tests/test_native_rtn.py). The torch path reads and writes each weight-sized tensor eight
// times or so; this reads each group once into registers and writes each output once.
//
// Compiled with -march=native for the machine that runs the compile (never shipped in an artifact) and
// -ffp-contract=off: a fused multiply-add would round differently from torch's separate operations.

#include <cmath>
#include <cstdint>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kFloat16Max = 65504.0f;

#if defined(__F16C__)
// float -> float16 bits, round to nearest even (what torch's .to(float16) does), for finite inputs <= 65504
inline uint16_t ToHalf(float x) { return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }
inline float FromHalf(uint16_t h) { return _cvtsh_ss(h); }
#else
// no F16C: float16 scales are refused (status 3) and the caller runs the torch path
inline uint16_t ToHalf(float) { return 0; }
inline float FromHalf(uint16_t) { return 0.0f; }
#endif

// round_scales: the float16 value at or above scale (scale > 0 and <= 65504).
inline float RoundScaleUpToHalf(float scale) {
  uint16_t h = ToHalf(scale);
  if (FromHalf(h) < scale) h = static_cast<uint16_t>(h + 1);  // nextafter towards +inf of a positive half
  return FromHalf(h);
}

// The scale and zero point of one group from its minimum and maximum (affine_params + round_scales).
// Returns 2 when a float16 scale would exceed 65504.
inline int GroupParams(float lo, float hi, float qmax, int scale_f16, float* scale_out, float* zero_out) {
  lo = lo < 0.0f ? lo : 0.0f;  // clamp(max=0)
  hi = hi > 0.0f ? hi : 0.0f;  // clamp(min=0)
  float scale = (hi - lo) / qmax;
  if (!(scale > 0.0f)) scale = 1.0f;
  if (scale_f16) {
    if (scale > kFloat16Max) return 2;
    scale = RoundScaleUpToHalf(scale);
  }
  float zero = std::nearbyint(-lo / scale);
  *scale_out = scale;
  *zero_out = zero < 0.0f ? 0.0f : (zero > qmax ? qmax : zero);
  return 0;
}

// codes, and the dequantized weights, of n values with one scale and zero point
inline void GroupCodes(const float* x, int64_t n, float scale, float zero, float qmax, uint8_t* q_out,
                       float* f_out) {
  for (int64_t i = 0; i < n; ++i) {
    float q = x[i] / scale;
    q = q + zero;
    q = std::nearbyint(q);
    q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
    if (q_out) q_out[i] = static_cast<uint8_t>(q);
    if (f_out) f_out[i] = (q - zero) * scale;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// v[0..15] -> one vector whose lane g is op over the 16 lanes of v[g]: 15 ops and 30 shuffles, where 16
// separate horizontal reductions take 64 of each.
template <class Op>
inline __m512 Reduce16(const __m512* v, Op op) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // [a01 b01] op [a23 b23] (128-bit blocks)
    s1[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // one block per group
    s2[i] = op(_mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0x88),
               _mm512_shuffle_f32x4(s1[2 * i], s1[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // two lanes per group
    s3[i] = op(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
               _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = op(_mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4j + m of r holds group j + 4m
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// GroupParams for 16 groups at once. Returns 1 (a NaN or infinity) or 2 (float16 overflow) like the scalar one.
inline int GroupParams16(__m512 lo, __m512 hi, __m512 bad, int count, float qmax, int scale_f16, float* scale_out,
                         float* zero_out) {
  const __mmask16 live = static_cast<__mmask16>((1u << count) - 1u);
  if (_mm512_mask_cmp_ps_mask(live, bad, _mm512_setzero_ps(), _CMP_NEQ_UQ)) return 1;
  const __m512 zero_v = _mm512_setzero_ps(), q = _mm512_set1_ps(qmax);
  lo = _mm512_min_ps(lo, zero_v);  // lo < 0 ? lo : 0 (lo is no NaN here)
  hi = _mm512_max_ps(hi, zero_v);
  __m512 scale = _mm512_div_ps(_mm512_sub_ps(hi, lo), q);
  scale = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, zero_v, _CMP_GT_OQ), _mm512_set1_ps(1.0f), scale);
  if (scale_f16) {
    if (_mm512_mask_cmp_ps_mask(live, scale, _mm512_set1_ps(kFloat16Max), _CMP_GT_OQ)) return 2;
    __m256i h = _mm512_cvtps_ph(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 low = _mm512_cmp_ps_mask(_mm512_cvtph_ps(h), scale, _CMP_LT_OQ);
    h = _mm256_mask_add_epi16(h, low, h, _mm256_set1_epi16(1));  // the next float16 up
    scale = _mm512_cvtph_ps(h);
  }
  __m512 zero = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(zero_v, lo), scale),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  zero = _mm512_min_ps(_mm512_max_ps(zero, zero_v), q);
  _mm512_mask_storeu_ps(scale_out, live, scale);
  _mm512_mask_storeu_ps(zero_out, live, zero);
  return 0;
}
#endif

// The scale and zero point of every group of one row (see dmpq_rtn_affine). Returns its status.
int RowParams(const float* row, int64_t k, int64_t group, float qmax, int scale_f16, float* scales, float* zeros) {
  const int64_t groups = (k + group - 1) / group;
  int64_t g = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (group % 16 == 0) {  // whole groups, 16 at a time: minima and maxima as vectors, then one reduction
    const int64_t whole = k / group;
    for (; g < whole; g += 16) {
      const int count = static_cast<int>(whole - g < 16 ? whole - g : 16);
      __m512 vlo[16], vhi[16], vbad[16];
      for (int j = 0; j < count; ++j) {
        const float* x = row + (g + j) * group;
        __m512 lo = _mm512_loadu_ps(x), hi = lo, bad = _mm512_sub_ps(lo, lo);
        for (int64_t i = 16; i < group; i += 16) {
          const __m512 v = _mm512_loadu_ps(x + i);
          bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));  // NaN where v is NaN or infinite
          lo = _mm512_min_ps(lo, v);
          hi = _mm512_max_ps(hi, v);
        }
        vlo[j] = lo, vhi[j] = hi, vbad[j] = bad;
      }
      for (int j = count; j < 16; ++j) vlo[j] = vlo[0], vhi[j] = vhi[0], vbad[j] = vbad[0];
      const int status = GroupParams16(
          Reduce16(vlo, [](__m512 a, __m512 b) { return _mm512_min_ps(a, b); }),
          Reduce16(vhi, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); }),
          Reduce16(vbad, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); }), count, qmax, scale_f16,
          scales + g, zeros + g);
      if (status) return status;
    }
    g = whole;  // a shorter last group, if any, goes below
  }
#endif
  for (; g < groups; ++g) {
    const int64_t c0 = g * group, n = (c0 + group <= k) ? group : k - c0;
    const float* x = row + c0;
    float lo = x[0], hi = x[0], bad = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i];
      bad += v - v;  // NaN when v is NaN or infinite
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    if (bad != 0.0f) return 1;  // also true for a NaN sum
    const int status = GroupParams(lo, hi, qmax, scale_f16, scales + g, zeros + g);
    if (status) return status;
  }
  return 0;
}

// float -> bfloat16 bits, round to nearest even: torch's conversion of a finite float (no flush of subnormals)
inline uint16_t ToBfloat16(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float FromBfloat16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
}

// k bfloat16 values widened (exactly) into out; returns out
inline const float* Widen(const uint16_t* src, int64_t k, float* out) {
  for (int64_t i = 0; i < k; ++i) out[i] = FromBfloat16(src[i]);
  return out;
}

// The squared changes of a row: float32 lanes (vector path) and a double (scalar tails), summed per row.
struct SquareSum {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 lanes = _mm512_setzero_ps();
#endif
  double tail = 0.0;
  double Take() {  // the row's sum; starts the next row at zero
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    tail += static_cast<double>(_mm512_reduce_add_ps(lanes));
    lanes = _mm512_setzero_ps();
#endif
    const double total = tail;
    tail = 0.0;
    return total;
  }
};

// One group's change (fake - x) and fake-quantized values in bfloat16; its squared changes added to sum.
inline void GroupChange(const float* x, int64_t n, float scale, float zero, float qmax, uint16_t* change,
                        uint16_t* fake, SquareSum& sum) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero), lo = _mm512_setzero_ps(),
               hi = _mm512_set1_ps(qmax);
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  __m512 acc = sum.lanes;
  auto bf16 = [&](__m512 v) {  // round to nearest even, as ToBfloat16
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, bias), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
  };
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    __m512 q = _mm512_add_ps(_mm512_div_ps(v, s), z);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(q, z), s);
    const __m512 d = _mm512_sub_ps(f, v);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(change + i), bf16(d));
    if (fake) _mm256_storeu_si256(reinterpret_cast<__m256i*>(fake + i), bf16(f));
  }
  sum.lanes = acc;
#endif
  for (; i < n; ++i) {
    float q = x[i] / scale;
    q = q + zero;
    q = std::nearbyint(q);
    q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
    const float f = (q - zero) * scale;
    const float d = f - x[i];
    sum.tail += static_cast<double>(d * d);
    change[i] = ToBfloat16(d);
    if (fake) fake[i] = ToBfloat16(f);
  }
}

}  // namespace

extern "C" {

// w: [rows, k] float32 (w_bf16 = 0) or bfloat16 bits (w_bf16 = 1: widened exactly), row-major. Groups of
// `group` consecutive columns per row (the last one shorter when group does not divide k: rtn.py edge-pads it
// with the row's last value, which changes neither its minimum nor its maximum). bits in 1..8. scale_f16:
// round each scale up to a float16 value.
// Outputs: scale, zero [rows, groups] float32 (always written); codes [rows, k] uint8 and fake [rows, k] float32
// (each may be null).
// Returns 0; 1 when a group holds a NaN or an infinity; 2 when a float16 scale would exceed 65504 (the caller
// then runs the torch path, which raises the error with its message); 3 for float16 scales on a CPU without
// F16C (the torch path runs); 4 when scratch memory cannot be had. On a nonzero return the outputs are partly
// written.
__attribute__((visibility("default")))
int dmpq_rtn_affine(const void* w, int w_bf16, int64_t rows, int64_t k, int64_t group, int bits, int scale_f16,
                    float* scale_out, float* zero_out, uint8_t* codes, float* fake) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t groups = (k + group - 1) / group;
#if !defined(__F16C__)
  if (scale_f16) return 3;
#endif
  float* wide = w_bf16 ? static_cast<float*>(__builtin_malloc(sizeof(float) * static_cast<size_t>(k))) : nullptr;
  if (w_bf16 && !wide) return 4;
  int status = 0;
  for (int64_t r = 0; r < rows && !status; ++r) {
    const float* row = w_bf16 ? Widen(static_cast<const uint16_t*>(w) + r * k, k, wide)
                              : static_cast<const float*>(w) + r * k;
    float* scales = scale_out + r * groups;
    float* zeros = zero_out + r * groups;
    status = RowParams(row, k, group, qmax, scale_f16, scales, zeros);
    if (status || !(codes || fake)) continue;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, n = (c0 + group <= k) ? group : k - c0;
      GroupCodes(row + c0, n, scales[g], zeros[g], qmax, codes ? codes + r * k + c0 : nullptr,
                 fake ? fake + r * k + c0 : nullptr);
    }
  }
  __builtin_free(wide);
  return status;
}

// What the sensitivity pass prices a fake quantization by, in one pass per row: the change of the weights
// (fake-quantized minus as they are, as float32, rounded to bfloat16 the way torch rounds), optionally the
// fake-quantized weights in bfloat16, and the sum of the squared float32 changes. w: [rows, k], float32
// (w_bf16 = 0) or bfloat16 bits (w_bf16 = 1: widened exactly); the rest as dmpq_rtn_affine, whose values the
// fake-quantized weights are. Outputs: change [rows, k] and fake [rows, k] (may be null) bfloat16 bits,
// *sumsq. Returns dmpq_rtn_affine's statuses. On the calling thread: split over two threads it took 2.6 instead
// of 3.8 ms for an OLMoE expert's three matrices alone, but 10-11 instead of 9-10 ms between the bf16 products
// it feeds, whose OpenMP workers spin for a while after each product (a 2-core Xeon).
__attribute__((visibility("default")))
int dmpq_rtn_affine_change(const void* w, int w_bf16, int64_t rows, int64_t k, int64_t group, int bits,
                           int scale_f16, uint16_t* change, uint16_t* fake, double* sumsq) {
#if !defined(__F16C__)
  if (scale_f16) return 3;
#endif
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t groups = (k + group - 1) / group;
  // scratch: one row widened to float32 (bfloat16 input) and its groups' scales and zero points
  float* wide = static_cast<float*>(__builtin_malloc(sizeof(float) * static_cast<size_t>(k + 2 * groups)));
  if (!wide) return 4;
  float *scales = wide + k, *zeros = wide + k + groups;
  double total = 0.0;
  SquareSum sum;
  int status = 0;
  for (int64_t r = 0; r < rows && !status; ++r) {
    const float* row = w_bf16 ? Widen(static_cast<const uint16_t*>(w) + r * k, k, wide)
                              : static_cast<const float*>(w) + r * k;
    status = RowParams(row, k, group, qmax, scale_f16, scales, zeros);
    if (status) break;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group, n = (c0 + group <= k) ? group : k - c0;
      GroupChange(row + c0, n, scales[g], zeros[g], qmax, change + r * k + c0, fake ? fake + r * k + c0 : nullptr,
                  sum);
    }
    total += sum.Take();
  }
  __builtin_free(wide);
  *sumsq = total;
  return status;
}

}  // extern "C"
