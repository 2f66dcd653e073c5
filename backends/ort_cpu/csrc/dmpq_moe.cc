// dmpq's onnxruntime custom-op library: `ai.dmpq.MixedMoE`, one layer's routed SwiGLU experts at
// mixed bit-widths (2, 4 and 8) in one node, `ai.dmpq.PanelMatMul`, one quantized projection
// (attention's, the LM head's) in the same panels with the same dot products (described at its class),
// and `ai.dmpq.GroupQueryAttention`, attention over onnxruntime-genai's KV cache (at its class, and gqa.h).
//
// Inputs
//   0 x        float   [N, H]   the layer's (flattened) input rows
//   1 top_i    int64   [N, k]   the experts each row is routed to (the layer's own TopK)
//   2 top_w    float   [N, k]   their mixing weights (the family's normalization already applied)
//   3 codes    uint8   [C]      every expert's codes in 16-row panels, experts one after the other
//   4 scales   float16 [S]      every expert's block scales
//   5 zeros    uint8   [Z]      every expert's block zero points, one byte a block
//   6 meta     int64   [E, 8]   per expert: bits (0: not in this node), then the element offsets of
//                               its gate/up codes, down codes, gate/up scales, down scales, gate/up
//                               zero points, down zero points; the last column is 0
// Attributes: hidden (H), inter (I), block_size, accuracy_level (0: fp32 activations, 4: int8).
// Output      float   [N, H]   sum over each row's routed experts that are in this node, in
//                               ascending expert order, of weight * down(silu(gate x) * up x).
//
// An expert's gate and up rows are stacked ([2I, H], gate first), its down rows are [H, I]; the codes
// are the stored ones, rearranged by the lowering into 16-row panels (see "Panel layout" below: a
// byte permutation, so that one 32-bit vector lane is one row); the weight is (code - zero) * scale,
// as dmpq stores it, with the scales and zero points of a panel's block side by side.
//
// accuracy_level 4 quantizes each activation block symmetrically to int8 (scale max|x| / 127) and
// takes integer dot products: the block's sum is s_w * s_x * (sum code * q - zero * sum q).
// accuracy_level 0 keeps fp32 activations: s_w * sum (code - zero) * x.
//
// Paths, chosen at load: AVX-512 VNNI where the CPU has it, else AVX2 + FMA + F16C, else portable C++.
// They compute the same integer sums exactly and the same float operations per row in the same order, so
// their results are identical bit for bit (the portable path is far slower). DMPQ_KERNEL_PATH=avx512-vnni,
// avx2 or portable forces one; a path the CPU lacks, or a name that is none, fails registration with the
// missing CPU features. dmpq_kernel_path() reports the path.
//
// Threads: onnxruntime's intra-op threads (KernelContext_ParallelFor, onnxruntime 1.17 on), else, or
// with DMPQ_KERNEL_POOL=own, a pool of its own (DMPQ_KERNEL_THREADS, else the CPUs this process may run
// on). The gate and up products are split over (expert, 64 rows), the down products over 64 output columns, so
// every output element is summed by one thread in a fixed order (the result does not depend on the
// thread count). Workers spin DMPQ_KERNEL_SPIN pause instructions (default 4000) before sleeping.

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "gqa.h"
#include "ort_abi.h"

namespace {

using dmpq_ort::Api;
using dmpq_ort::ApiTable;

constexpr int kGroup = 64;     // the smallest block size
constexpr int kMetaCols = 8;
constexpr int kRowsPerJob = 64;
constexpr int kTile = 8;       // tokens per weight-row pass (at most; an expert's rows are split into even tiles)

// ---------------------------------------------------------------------------------------------
// Thread pool: the caller runs jobs too; workers spin briefly between calls, then sleep.

class Pool {
 public:
  explicit Pool(int threads) {
    const char* spin = std::getenv("DMPQ_KERNEL_SPIN");
    spin_ = spin ? std::max(0, std::atoi(spin)) : 4000;
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Worker(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  template <class F>
  void Run(int jobs, F&& f) {
    if (jobs <= 0) return;
    if (workers_.empty() || jobs == 1) {
      for (int j = 0; j < jobs; ++j) f(j);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one parallel section at a time
    using Fn = std::remove_reference_t<F>;
    fn_ = [](void* ctx, int j) { (*static_cast<Fn*>(ctx))(j); };
    ctx_ = &f;
    jobs_ = jobs;
    next_.store(0);
    pending_.store(static_cast<int>(workers_.size()));
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    Drain();
    // Wait for the workers; on a busy machine a worker may be descheduled, so stop spinning soon.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0;) {
      if (++spins < spin_) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (error_) {
      std::string msg = *error_;
      error_.reset();
      throw std::runtime_error(msg);
    }
  }

 private:
  void Drain() {
    for (int j; (j = next_.fetch_add(1)) < jobs_;) {
      try {
        fn_(ctx_, j);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_.reset(new std::string(e.what()));
      }
    }
  }
  void Worker() {
    uint64_t seen = 0;  // the generation at construction: a Run may start before this thread does
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = gen_.load(std::memory_order_acquire)) == seen) {
        if (++spins < spin_) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
      }
      seen = g;
      if (stop_.load()) return;
      Drain();
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_, err_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> next_{0}, pending_{0};
  int jobs_ = 0, spin_ = 0;
  void (*fn_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<bool> stop_{false};
  std::unique_ptr<std::string> error_;
};

int DefaultThreads() {
  if (const char* env = std::getenv("DMPQ_KERNEL_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& SharedPool() {
  static Pool pool(DefaultThreads());
  return pool;
}

// Whether loops run on onnxruntime's intra-op threads (KernelContext_ParallelFor; set at registration
// from the runtime's version) or on the library's own pool (older onnxruntime, or DMPQ_KERNEL_POOL=own).
std::atomic<bool> g_ort_pool{false};

// Runs f(0 .. jobs-1) on onnxruntime's threads for this kernel call; an exception in a job is rethrown.
template <class F>
void OrtParallelFor(const Api& api, dmpq_ort::OrtKernelContext* ctx, int jobs, F& f) {
  struct Call {
    F* f;
    std::mutex mu;
    std::string error;
  } call{&f, {}, {}};
  auto tramp = [](void* data, size_t j) {
    auto* c = static_cast<Call*>(data);
    try {
      (*c->f)(static_cast<int>(j));
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(c->mu);
      if (c->error.empty()) c->error = e.what();
    }
  };
  dmpq_ort::OrtStatus* st = api.KernelContextParallelFor(ctx, tramp, static_cast<size_t>(jobs), 0, &call);
  if (st) {
    std::string msg = std::string("dmpq MixedMoE: onnxruntime's thread pool: ") + api.GetErrorMessage(st);
    api.ReleaseStatus(st);
    throw std::runtime_error(msg);
  }
  if (!call.error.empty()) throw std::runtime_error(call.error);
}

// ---------------------------------------------------------------------------------------------
// Numbers

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      bits = sign | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One vector's activations as the dot products read them (natural order).
struct Act {
  const int8_t* q = nullptr;   // level 4: int8, K
  const float* sa = nullptr;   // level 4: per block, the int8 scale
  const float* sq = nullptr;   // level 4: per block, scale * sum of the block's int8 values
  const float* xf = nullptr;   // level 0: fp32, K
};

// Level 4: quantize `x` (K values) per block: int8 codes, scales, scale * sums. The vector paths below do
// the same operations (a block's largest |x| is the same in any order; NaN is skipped by both; the
// products round the same; conversion rounds to nearest even as nearbyint does in the default mode), so
// their codes, scales and sums are these bit for bit.
using QuantFn = void (*)(const float* x, int K, int bs, int8_t* q, float* sa, float* sq);

void QuantizeActs(const float* x, int K, int bs, int8_t* q, float* sa, float* sq) {
  for (int b = 0; b < K / bs; ++b) {
    const float* xb = x + b * bs;
    float amax = 0.f;
    for (int i = 0; i < bs; ++i) amax = std::max(amax, std::fabs(xb[i]));
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < bs; ++i) {
      int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      v = std::min(127, std::max(-127, v));
      q[b * bs + i] = static_cast<int8_t>(v);
      sum += v;
    }
    sa[b] = amax / 127.f;
    sq[b] = sa[b] * static_cast<float>(sum);
  }
}

#define DMPQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define DMPQ_AVX2 __attribute__((target("avx2,fma,f16c")))

DMPQ_AVX512 void QuantizeActs512(const float* x, int K, int bs, int8_t* q, float* sa, float* sq) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int b = 0; b < K / bs; ++b) {
    const float* xb = x + b * bs;
    __m512 vmax = _mm512_setzero_ps();
    for (int i = 0; i < bs; i += 16) vmax = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(xb + i), absmask), vmax);
    const float amax = _mm512_reduce_max_ps(vmax);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i vsum = _mm512_setzero_si512();
    for (int i = 0; i < bs; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv));
      v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * bs + i), _mm512_cvtepi32_epi8(v));
      vsum = _mm512_add_epi32(vsum, v);
    }
    sa[b] = amax / 127.f;
    sq[b] = sa[b] * static_cast<float>(_mm512_reduce_add_epi32(vsum));
  }
}

DMPQ_AVX2 void QuantizeActs256(const float* x, int K, int bs, int8_t* q, float* sa, float* sq) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int b = 0; b < K / bs; ++b) {
    const float* xb = x + b * bs;
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < bs; i += 8) vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + i), absmask), vmax);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i vsum = _mm256_setzero_si256();
    for (int i = 0; i < bs; i += 8) {
      __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv));
      v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
      const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + b * bs + i), _mm_packs_epi16(w16, w16));  // exact: |v| <= 127
      vsum = _mm256_add_epi32(vsum, v);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    sa[b] = amax / 127.f;
    sq[b] = sa[b] * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// SwiGLU's silu(g) * u = g / (1 + exp(-g)) * u for one panel's 16 rows. exp is dmpq's own (libm's expf is a
// call per value, about a tenth of a prefill's time): x clamped to [-87, 88] (NaN to -87), exp(x) =
// 2^n * p(r) with n = nearest(x / ln 2), r = x - n ln 2 in two fma steps, p the degree-6 Taylor polynomial
// (error below 2e-7 relative on |r| <= ln 2 / 2). Each path does these float operations in this order, so
// all three give the same bits.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[7] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};  // highest power first
using SiluFn = void (*)(const float* g, const float* u, float* out);

inline float ExpRef(float x) {
  x = std::min(88.f, std::max(-87.f, x));
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(n, -kLn2Lo, std::fma(n, -kLn2Hi, x));
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, r, kExpPoly[i]);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

void SiluMulRef(const float* g, const float* u, float* out) {
  for (int i = 0; i < 16; ++i) out[i] = g[i] / (1.f + ExpRef(0.f - g[i])) * u[i];  // 0 - g: as the vector paths
}

DMPQ_AVX512 void SiluMul512(const float* g, const float* u, float* out) {
  const __m512 gv = _mm512_loadu_ps(g);
  __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), gv);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 scale = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  const __m512 e = _mm512_mul_ps(p, scale);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u)));
}

DMPQ_AVX2 void SiluMul256(const float* g, const float* u, float* out) {
  for (int h = 0; h < 16; h += 8) {
    const __m256 gv = _mm256_loadu_ps(g + h);
    __m256 x = _mm256_sub_ps(_mm256_setzero_ps(), gv);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x));
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_mul_ps(p, scale);
    _mm256_storeu_ps(out + h, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(u + h)));
  }
}

// ---------------------------------------------------------------------------------------------
// Dot products of one 16-row panel of a weight with up to kTile activation vectors.
//
// Panel layout (written by the lowering, matmulnbits.panel_codes): a weight's rows in panels of 16; a
// panel's codes in units of 64 bytes along K, a unit holding 32 / bits columns of all 16 rows: byte
// 4 * i + j of a unit is row i's codes at columns k + 4 * m + j for m = 0 .. 8 / bits - 1, code m in
// bits [m * bits, (m + 1) * bits). One int32 lane of a 64-byte vector is then one row, and a dot
// product step takes 4 activations broadcast to all lanes. Scales and zero points: per panel and
// block, the 16 rows' values side by side.

constexpr int kPanel = 16;

// With several tokens a panel is compute-bound, and the hardware prefetcher alone leaves the first tile
// waiting on memory (a prefill streams each routed expert's weights from DRAM once): the dot products
// of a tile fetch the codes this many bytes ahead (32 units, a third of a 4-bit panel at K = 2048).
// One token streams at memory speed without it, and prefetching past a matrix's end there would only
// add traffic, so decode does not.
constexpr int kPrefetch = 2048;

struct Panel {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint8_t* zeros;
};

// out[t * 16 + i]: row i of the panel times activation vector t.
using DotFn = void (*)(const Panel&, int bits, int K, int bs, const Act* const* acts, int nt, float* out);

inline int PanelCode(const uint8_t* codes, int bits, int i, int k) {
  const int unit = 32 / bits, u = k / unit, m = (k % unit) / 4, j = k % 4;
  return (codes[u * 64 + 4 * i + j] >> (m * bits)) & ((1 << bits) - 1);
}

void DotRef(const Panel& p, int bits, int K, int bs, const Act* const* acts, int nt, float* out) {
  for (int t = 0; t < nt; ++t) {
    for (int i = 0; i < kPanel; ++i) {
      float acc = 0.f;
      for (int b = 0; b < K / bs; ++b) {
        const float s = HalfToFloat(p.scales[b * kPanel + i]), z = p.zeros[b * kPanel + i];
        if (acts[t]->q) {
          int32_t iacc = 0;
          for (int k = b * bs; k < (b + 1) * bs; ++k) iacc += PanelCode(p.codes, bits, i, k) * acts[t]->q[k];
          // the vector path's operations, in its order (each fma rounds once, as there)
          acc = std::fma(static_cast<float>(iacc), s * acts[t]->sa[b], acc);
          acc = std::fma(-(s * z), acts[t]->sq[b], acc);
        } else {
          float bacc = 0.f;
          for (int k = b * bs; k < (b + 1) * bs; ++k)
            bacc = std::fma(static_cast<float>(PanelCode(p.codes, bits, i, k)) - z, acts[t]->xf[k], bacc);
          acc = std::fma(bacc, s, acc);
        }
      }
      out[t * kPanel + i] = acc;
    }
  }
}

DMPQ_AVX512 inline __m512i Broadcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm512_set1_epi32(v);
}

// Plane m of a unit: the codes at columns k + 4m .. k + 4m + 3 of the 16 rows, one byte each.
template <int BITS>
DMPQ_AVX512 inline __m512i Plane(__m512i v, int m) {
  if (BITS == 8) return v;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  return _mm512_and_si512(_mm512_srli_epi16(v, m * BITS), mask);
}

template <int BITS, int NT>
DMPQ_AVX512 void DotQ512(const Panel& p, int K, int bs, const Act* const* acts, float* out) {
  constexpr int unit = 32 / BITS, planes = 8 / BITS;
  const uint8_t* c = p.codes;
  const int8_t* qs[NT];  // the activations, out of `acts` (read once: the stores below could alias them)
  for (int t = 0; t < NT; ++t) qs[t] = acts[t]->q;
  __m512 facc[NT];
  for (int t = 0; t < NT; ++t) facc[t] = _mm512_setzero_ps();
  for (int b = 0; b < K / bs; ++b) {
    __m512i iacc[NT];
    for (int t = 0; t < NT; ++t) iacc[t] = _mm512_setzero_si512();
    for (int k = b * bs; k < (b + 1) * bs; k += unit, c += 64) {
      if (NT > 1) _mm_prefetch(reinterpret_cast<const char*>(c) + kPrefetch, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(c);
      for (int m = 0; m < planes; ++m) {
        const __m512i w = Plane<BITS>(v, m);
        for (int t = 0; t < NT; ++t) iacc[t] = _mm512_dpbusd_epi32(iacc[t], w, Broadcast4(qs[t] + k + 4 * m));
      }
    }
    const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + b * kPanel)));
    const __m512 zw = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + b * kPanel))));
    const __m512 swz = _mm512_mul_ps(sw, zw);
    for (int t = 0; t < NT; ++t) {
      facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[t]), _mm512_mul_ps(sw, _mm512_set1_ps(acts[t]->sa[b])),
                                facc[t]);
      facc[t] = _mm512_fnmadd_ps(swz, _mm512_set1_ps(acts[t]->sq[b]), facc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * kPanel, facc[t]);
}

template <int BITS, int NT>
DMPQ_AVX512 void DotF512(const Panel& p, int K, int bs, const Act* const* acts, float* out) {
  constexpr int unit = 32 / BITS, planes = 8 / BITS;
  const uint8_t* c = p.codes;
  const __m512i byte = _mm512_set1_epi32(0xff);
  __m512 facc[NT];
  for (int t = 0; t < NT; ++t) facc[t] = _mm512_setzero_ps();
  for (int b = 0; b < K / bs; ++b) {
    const __m512 zw = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zeros + b * kPanel))));
    __m512 bacc[NT];
    for (int t = 0; t < NT; ++t) bacc[t] = _mm512_setzero_ps();
    for (int k = b * bs; k < (b + 1) * bs; k += unit, c += 64) {
      const __m512i v = _mm512_loadu_si512(c);
      for (int m = 0; m < planes; ++m) {
        const __m512i w = Plane<BITS>(v, m);
        for (int j = 0; j < 4; ++j) {  // column k + 4m + j of the 16 rows
          const __m512 wf = _mm512_sub_ps(
              _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(w, _mm512_set1_epi32(8 * j)), byte)), zw);
          for (int t = 0; t < NT; ++t)
            bacc[t] = _mm512_fmadd_ps(wf, _mm512_set1_ps(acts[t]->xf[k + 4 * m + j]), bacc[t]);
        }
      }
    }
    const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + b * kPanel)));
    for (int t = 0; t < NT; ++t) facc[t] = _mm512_fmadd_ps(bacc[t], sw, facc[t]);
  }
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * kPanel, facc[t]);
}

template <int BITS>
DMPQ_AVX512 void Dot512Bits(const Panel& p, int K, int bs, const Act* const* acts, int nt, float* out) {
  const bool q = acts[0]->q != nullptr;
  switch (nt) {
    case 1: q ? DotQ512<BITS, 1>(p, K, bs, acts, out) : DotF512<BITS, 1>(p, K, bs, acts, out); break;
    case 2: q ? DotQ512<BITS, 2>(p, K, bs, acts, out) : DotF512<BITS, 2>(p, K, bs, acts, out); break;
    case 3: q ? DotQ512<BITS, 3>(p, K, bs, acts, out) : DotF512<BITS, 3>(p, K, bs, acts, out); break;
    case 4: q ? DotQ512<BITS, 4>(p, K, bs, acts, out) : DotF512<BITS, 4>(p, K, bs, acts, out); break;
    case 5: q ? DotQ512<BITS, 5>(p, K, bs, acts, out) : DotF512<BITS, 5>(p, K, bs, acts, out); break;
    case 6: q ? DotQ512<BITS, 6>(p, K, bs, acts, out) : DotF512<BITS, 6>(p, K, bs, acts, out); break;
    case 7: q ? DotQ512<BITS, 7>(p, K, bs, acts, out) : DotF512<BITS, 7>(p, K, bs, acts, out); break;
    default: q ? DotQ512<BITS, 8>(p, K, bs, acts, out) : DotF512<BITS, 8>(p, K, bs, acts, out); break;
  }
}

void Dot512(const Panel& p, int bits, int K, int bs, const Act* const* acts, int nt, float* out) {
  switch (bits) {
    case 2: Dot512Bits<2>(p, K, bs, acts, nt, out); break;
    case 4: Dot512Bits<4>(p, K, bs, acts, nt, out); break;
    default: Dot512Bits<8>(p, K, bs, acts, nt, out); break;
  }
}

// AVX2 + FMA + F16C: the same panels as two 256-bit halves (rows 0-7: bytes 0-31 of a unit, rows 8-15:
// bytes 32-63), the same integer sums and the same float operations in the same order per row, so its
// results are the AVX-512 path's bit for bit. Without VNNI an int8 step is _mm256_maddubs_epi16 (u8 codes
// x s8 activations -> s16 sums of 2 products, |sum| <= 2 * 15 * 127 = 3810 for codes < 16, so it never
// saturates), added up in 16 bits for 32 columns (at most 8 steps: |sum| <= 30480 < 32768, exact), then
// _mm256_madd_epi16 with ones -> int32. 8-bit codes (2 * 255 * 127 would saturate) go as two nibbles:
// code * q = lo * q + 16 * hi * q, each nibble's sums as above.

DMPQ_AVX2 inline __m256i Broadcast4x8(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}

// Plane m of a half unit (2 and 4 bits): the codes at columns k + 4m .. k + 4m + 3 of 8 rows, one byte each.
template <int BITS>
DMPQ_AVX2 inline __m256i Plane256(__m256i v, int m) {
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  return _mm256_and_si256(_mm256_srli_epi16(v, m * BITS), mask);
}

DMPQ_AVX2 inline __m256 HalfScales(const Panel& p, int b, int h) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scales + b * kPanel + 8 * h)));
}

DMPQ_AVX2 inline __m256 HalfZeros(const Panel& p, int b, int h) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zeros + b * kPanel + 8 * h))));
}

// Level 4, rows 8 h .. 8 h + 7 for h in [h0, h0 + HALVES). The small loops are unrolled by pragma: without it
// g++ 12 kept the 16-bit sums of 4 tokens on the stack (a store and a reload per step), and a 128-token
// prefill of one OLMoE layer took 1.23x (4-bit) to 1.43x (8-bit) the time on an AVX2-only AMD EPYC
// (benchmarks/README.md, "The kernel on an AVX2-only CPU"). Rewriting the unit loop with a constant count
// made g++ spill more, not less (slower): keep its form.
template <int BITS, int NT, int HALVES>
DMPQ_AVX2 void DotQ256(const Panel& p, int K, int bs, const Act* const* acts, int h0, float* out) {
  constexpr int unit = 32 / BITS, planes = 8 / BITS, chunk = 32;  // chunk: columns summed in 16 bits
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0f);
  const uint8_t* c = p.codes + 32 * h0;
  const int8_t* qs[NT];  // as DotQ512
  #pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) qs[t] = acts[t]->q;
  __m256 facc[HALVES][NT];
  #pragma GCC unroll 16
  for (int h = 0; h < HALVES; ++h)
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) facc[h][t] = _mm256_setzero_ps();
  for (int b = 0; b < K / bs; ++b) {
    __m256i iacc[HALVES][NT];
    #pragma GCC unroll 16
    for (int h = 0; h < HALVES; ++h)
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) iacc[h][t] = _mm256_setzero_si256();
    for (int k0 = b * bs; k0 < (b + 1) * bs; k0 += chunk) {
      __m256i lo[HALVES][NT], hi[HALVES][NT];  // hi: 8 bits only
      #pragma GCC unroll 16
      for (int h = 0; h < HALVES; ++h)
        #pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) lo[h][t] = hi[h][t] = _mm256_setzero_si256();
      #pragma GCC unroll 16
      for (int k = k0; k < k0 + chunk; k += unit, c += 64) {
        if (NT > 1) _mm_prefetch(reinterpret_cast<const char*>(c) + kPrefetch, _MM_HINT_T0);
        __m256i v[HALVES];
        #pragma GCC unroll 16
        for (int h = 0; h < HALVES; ++h) v[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
        #pragma GCC unroll 16
        for (int m = 0; m < planes; ++m) {
          __m256i w[HALVES], wh[HALVES];
          #pragma GCC unroll 16
          for (int h = 0; h < HALVES; ++h) {
            if (BITS == 8) {
              w[h] = _mm256_and_si256(v[h], nibble);
              wh[h] = _mm256_and_si256(_mm256_srli_epi16(v[h], 4), nibble);
            } else {
              w[h] = Plane256<BITS == 8 ? 4 : BITS>(v[h], m);
            }
          }
          #pragma GCC unroll 16
          for (int t = 0; t < NT; ++t) {
            const __m256i a = Broadcast4x8(qs[t] + k + 4 * m);
            #pragma GCC unroll 16
            for (int h = 0; h < HALVES; ++h) {
              lo[h][t] = _mm256_add_epi16(lo[h][t], _mm256_maddubs_epi16(w[h], a));
              if (BITS == 8) hi[h][t] = _mm256_add_epi16(hi[h][t], _mm256_maddubs_epi16(wh[h], a));
            }
          }
        }
      }
      #pragma GCC unroll 16
      for (int h = 0; h < HALVES; ++h)
        #pragma GCC unroll 16
        for (int t = 0; t < NT; ++t) {
          iacc[h][t] = _mm256_add_epi32(iacc[h][t], _mm256_madd_epi16(lo[h][t], ones));
          if (BITS == 8) iacc[h][t] = _mm256_add_epi32(iacc[h][t], _mm256_slli_epi32(_mm256_madd_epi16(hi[h][t], ones), 4));
        }
    }
    #pragma GCC unroll 16
    for (int h = 0; h < HALVES; ++h) {
      const __m256 sw = HalfScales(p, b, h0 + h), swz = _mm256_mul_ps(sw, HalfZeros(p, b, h0 + h));
      #pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        facc[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[h][t]), _mm256_mul_ps(sw, _mm256_set1_ps(acts[t]->sa[b])),
                                     facc[h][t]);
        facc[h][t] = _mm256_fnmadd_ps(swz, _mm256_set1_ps(acts[t]->sq[b]), facc[h][t]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int h = 0; h < HALVES; ++h)
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + t * kPanel + 8 * (h0 + h), facc[h][t]);
}

// Level 0, rows 8 h .. 8 h + 7 for h in [h0, h0 + HALVES).
template <int BITS, int NT, int HALVES>
DMPQ_AVX2 void DotF256(const Panel& p, int K, int bs, const Act* const* acts, int h0, float* out) {
  constexpr int unit = 32 / BITS, planes = 8 / BITS;
  const uint8_t* c = p.codes + 32 * h0;
  const __m256i byte = _mm256_set1_epi32(0xff);
  __m256 facc[HALVES][NT];
  for (int h = 0; h < HALVES; ++h)
    for (int t = 0; t < NT; ++t) facc[h][t] = _mm256_setzero_ps();
  for (int b = 0; b < K / bs; ++b) {
    __m256 zw[HALVES], bacc[HALVES][NT];
    for (int h = 0; h < HALVES; ++h) {
      zw[h] = HalfZeros(p, b, h0 + h);
      for (int t = 0; t < NT; ++t) bacc[h][t] = _mm256_setzero_ps();
    }
    for (int k = b * bs; k < (b + 1) * bs; k += unit, c += 64) {
      __m256i v[HALVES];
      for (int h = 0; h < HALVES; ++h) v[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
      for (int m = 0; m < planes; ++m) {
        __m256i w[HALVES];
        for (int h = 0; h < HALVES; ++h) w[h] = BITS == 8 ? v[h] : Plane256<BITS == 8 ? 4 : BITS>(v[h], m);
        for (int j = 0; j < 4; ++j) {  // column k + 4m + j of the rows
          __m256 wf[HALVES];
          for (int h = 0; h < HALVES; ++h)
            wf[h] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w[h], 8 * j), byte)), zw[h]);
          for (int t = 0; t < NT; ++t) {
            const __m256 x = _mm256_set1_ps(acts[t]->xf[k + 4 * m + j]);
            for (int h = 0; h < HALVES; ++h) bacc[h][t] = _mm256_fmadd_ps(wf[h], x, bacc[h][t]);
          }
        }
      }
    }
    for (int h = 0; h < HALVES; ++h) {
      const __m256 sw = HalfScales(p, b, h0 + h);
      for (int t = 0; t < NT; ++t) facc[h][t] = _mm256_fmadd_ps(bacc[h][t], sw, facc[h][t]);
    }
  }
  for (int h = 0; h < HALVES; ++h)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + t * kPanel + 8 * (h0 + h), facc[h][t]);
}

// One token: both halves at once (two independent chains); more tokens: one half at a time (registers).
template <int BITS, int NT>
DMPQ_AVX2 void Dot256Tile(const Panel& p, int K, int bs, const Act* const* acts, float* out) {
  const bool q = acts[0]->q != nullptr;
  if (NT == 1) {
    q ? DotQ256<BITS, NT, 2>(p, K, bs, acts, 0, out) : DotF256<BITS, NT, 2>(p, K, bs, acts, 0, out);
    return;
  }
  for (int h = 0; h < 2; ++h)
    q ? DotQ256<BITS, NT, 1>(p, K, bs, acts, h, out) : DotF256<BITS, NT, 1>(p, K, bs, acts, h, out);
}

// Up to 4 tokens a pass (16 ymm registers); a tile of more runs as passes of 4 (tokens are independent).
template <int BITS>
DMPQ_AVX2 void Dot256Bits(const Panel& p, int K, int bs, const Act* const* acts, int nt, float* out) {
  for (int t0 = 0; t0 < nt; t0 += 4) {
    const Act* const* a = acts + t0;
    float* o = out + t0 * kPanel;
    switch (std::min(4, nt - t0)) {
      case 1: Dot256Tile<BITS, 1>(p, K, bs, a, o); break;
      case 2: Dot256Tile<BITS, 2>(p, K, bs, a, o); break;
      case 3: Dot256Tile<BITS, 3>(p, K, bs, a, o); break;
      default: Dot256Tile<BITS, 4>(p, K, bs, a, o); break;
    }
  }
}

void Dot256(const Panel& p, int bits, int K, int bs, const Act* const* acts, int nt, float* out) {
  switch (bits) {
    case 2: Dot256Bits<2>(p, K, bs, acts, nt, out); break;
    case 4: Dot256Bits<4>(p, K, bs, acts, nt, out); break;
    default: Dot256Bits<8>(p, K, bs, acts, nt, out); break;
  }
}

// The path: DMPQ_KERNEL_PATH (avx512-vnni, avx2 or portable) if set, else the best this CPU has. Read once,
// when first asked; a forced path the CPU lacks, or a name that is no path, makes registration fail with
// the reason (RegisterCustomOps), rather than run something else than asked.
struct PathChoice {
  const char* name;   // "avx512-vnni", "avx2", "portable"; "" when `error` is set
  std::string error;  // why the forced path cannot run here
};

// The CPU features (GCC's names) a path needs that this CPU (and OS) lacks, comma-separated.
std::string Lacking(const std::string& path) {
  __builtin_cpu_init();
  std::string out;
  auto need = [&out](bool has, const char* name) {
    if (!has) out += (out.empty() ? "" : ", ") + std::string(name);
  };
  if (path == "avx512-vnni") {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
    need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  }
  if (path == "avx2") need(__builtin_cpu_supports("avx2"), "avx2");
  if (path == "avx512-vnni" || path == "avx2") {
    need(__builtin_cpu_supports("fma"), "fma");
    need(__builtin_cpu_supports("f16c"), "f16c");
  }
  return out;  // portable: nothing
}

const PathChoice& Path() {
  static const PathChoice choice = []() -> PathChoice {
    const char* env = std::getenv("DMPQ_KERNEL_PATH");
    const std::string want = env ? env : "";
    if (want.empty()) {
      if (Lacking("avx512-vnni").empty()) return {"avx512-vnni", ""};
      if (Lacking("avx2").empty()) return {"avx2", ""};
      return {"portable", ""};
    }
    for (const char* name : {"avx512-vnni", "avx2", "portable"}) {
      if (want != name) continue;
      const std::string lacking = Lacking(want);
      if (lacking.empty()) return {name, ""};
      return {"", "DMPQ_KERNEL_PATH=" + want + " forces the " + want + " path, but this CPU lacks " + lacking +
                      "; unset DMPQ_KERNEL_PATH (the kernel then takes the best path this CPU has) or set it to a "
                      "path the CPU has (portable runs anywhere)"};
    }
    return {"", "DMPQ_KERNEL_PATH=" + want + " names no path of dmpq's kernel: set avx512-vnni, avx2 or portable, "
                    "or unset it (the best path this CPU has)"};
  }();
  return choice;
}

DotFn ChosenDot() {
  static const DotFn fn = [] {
    const std::string name = Path().name;
    if (name == "avx512-vnni") return Dot512;
    if (name == "avx2") return Dot256;
    if (name == "portable") return DotRef;
    throw std::runtime_error("dmpq MixedMoE: " + Path().error);  // registration refuses this first
  }();
  return fn;
}

SiluFn ChosenSilu() {
  static const SiluFn fn = [] {
    const std::string name = Path().name;
    if (name == "avx512-vnni") return SiluMul512;
    if (name == "avx2") return SiluMul256;
    return SiluMulRef;
  }();
  return fn;
}

QuantFn ChosenQuantize() {
  static const QuantFn fn = [] {
    const std::string name = Path().name;
    if (name == "avx512-vnni") return QuantizeActs512;
    if (name == "avx2") return QuantizeActs256;
    return QuantizeActs;
  }();
  return fn;
}

// ---------------------------------------------------------------------------------------------
// The op

struct Tensor {
  int type = 0;
  std::vector<int64_t> dims;
  void* data = nullptr;
  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

// Errors name the op: "dmpq OP: what: onnxruntime's message".
void Check(const Api& api, dmpq_ort::OrtStatus* st, const char* what, const char* op = "MixedMoE") {
  if (!st) return;
  std::string msg = std::string("dmpq ") + op + ": " + what + ": " + api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  throw std::runtime_error(msg);
}

void Describe(const Api& api, const dmpq_ort::OrtValue* v, Tensor* out, const char* op) {
  dmpq_ort::OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(api, api.GetTensorTypeAndShape(v, &info), "reading an input's shape", op);
  size_t n = 0;
  dmpq_ort::OrtStatus* st = api.GetTensorElementType(info, &out->type);
  if (!st) st = api.GetDimensionsCount(info, &n);
  out->dims.assign(n, 0);
  if (!st && n) st = api.GetDimensions(info, out->dims.data(), n);
  api.ReleaseTensorTypeAndShapeInfo(info);
  Check(api, st, "reading an input's shape", op);
  Check(api, api.GetTensorMutableData(const_cast<dmpq_ort::OrtValue*>(v), &out->data), "reading an input", op);
}

[[noreturn]] void Fail(const char* op, const std::string& msg) {
  throw std::runtime_error(std::string("dmpq ") + op + ": " + msg);
}

[[noreturn]] void Fail(const std::string& msg) { Fail("MixedMoE", msg); }

// The call's `count` inputs (exactly that many), described into `in`.
void ReadInputs(const Api& api, dmpq_ort::OrtKernelContext* ctx, size_t count, const char* op, Tensor* in) {
  size_t n_in = 0;
  Check(api, api.KernelContextGetInputCount(ctx, &n_in), "counting inputs", op);
  if (n_in != count) Fail(op, "expects " + std::to_string(count) + " inputs, got " + std::to_string(n_in));
  for (size_t i = 0; i < count; ++i) {
    const dmpq_ort::OrtValue* v = nullptr;
    Check(api, api.KernelContextGetInput(ctx, i, &v), "getting an input", op);
    Describe(api, v, &in[i], op);
  }
}

int64_t IntAttr(const Api& api, const dmpq_ort::OrtKernelInfo* info, const char* name, const char* op) {
  int64_t v = 0;
  dmpq_ort::OrtStatus* st = api.KernelInfoGetAttributeInt64(info, name, &v);
  if (st) {
    std::string msg = std::string("dmpq ") + op + ": attribute '" + name + "': " + api.GetErrorMessage(st);
    api.ReleaseStatus(st);
    throw std::runtime_error(msg);
  }
  return v;
}

// Runs f(0 .. jobs-1) on onnxruntime's threads (or the library's own pool), inline for one job.
template <class F>
void RunJobs(const Api& api, dmpq_ort::OrtKernelContext* ctx, int jobs, F&& f) {
  if (jobs <= 0) return;
  if (jobs == 1) {
    f(0);
  } else if (g_ort_pool.load()) {
    OrtParallelFor(api, ctx, jobs, f);
  } else {
    SharedPool().Run(jobs, f);
  }
}

// An expert's slots [begin, end) in tiles of at most kTile, as even as they go (9 slots: 5 + 4, not 8 + 1:
// a tile of one token runs at memory speed, half a full tile's).
struct Tiles {
  Tiles(int64_t begin, int64_t end)
      : s0(begin), end_(end), tiles_((end - begin + kTile - 1) / kTile), n_(end - begin) { Size(); }
  bool more() const { return s0 < end_; }
  void next() {
    s0 += nt;
    ++i_;
    Size();
  }
  int64_t s0;
  int nt = 0;

 private:
  void Size() {
    if (tiles_) nt = static_cast<int>(n_ / tiles_ + (i_ < n_ % tiles_ ? 1 : 0));
  }
  int64_t end_, tiles_, n_, i_ = 0;
};

struct ExpertMeta {
  int64_t bits, gu_codes, down_codes, gu_scales, down_scales, gu_zeros, down_zeros, reserved;
};

class MixedMoE {
 public:
  static constexpr const char* kName = "MixedMoE";
  static constexpr size_t kInputCount = 7;
  static constexpr size_t kOutputCount = 1;
  static const dmpq_ort::ElementType kInputs[7];

  MixedMoE(const Api& api, const dmpq_ort::OrtKernelInfo* info) : api_(api) {
    hidden_ = Attr(info, "hidden");
    inter_ = Attr(info, "inter");
    block_ = Attr(info, "block_size");
    level_ = Attr(info, "accuracy_level");
    if (hidden_ <= 0 || inter_ <= 0) Fail("hidden and inter must be positive");
    if (block_ < kGroup || block_ % kGroup) Fail("block_size must be a multiple of 64");
    if (hidden_ % block_ || inter_ % block_) Fail("hidden and inter must be whole blocks");  // so multiples of 64
    if (level_ != 0 && level_ != 4) Fail("accuracy_level must be 0 (fp32 activations) or 4 (int8)");
  }

  void Compute(dmpq_ort::OrtKernelContext* ctx) {
    Tensor in[7];
    ReadInputs(api_, ctx, 7, kName, in);
    const Tensor &x = in[0], &ti = in[1], &tw = in[2], &codes = in[3], &scales = in[4], &zeros = in[5],
                 &meta = in[6];
    const int64_t H = hidden_, I = inter_;
    if (x.dims.size() != 2 || x.dims[1] != H) Fail("x must be [N, hidden]");
    const int64_t N = x.dims[0];
    if (ti.dims.size() != 2 || ti.dims[0] != N || tw.dims != ti.dims) Fail("top_i and top_w must be [N, k]");
    const int64_t k = ti.dims[1];
    if (meta.dims.size() != 2 || meta.dims[1] != kMetaCols) Fail("meta must be [experts, 8]");
    const int64_t E = meta.dims[0];

    int64_t dims[2] = {N, H};
    dmpq_ort::OrtValue* out_v = nullptr;
    Check(api_, api_.KernelContextGetOutput(ctx, 0, dims, 2, &out_v), "making the output");
    void* out_p = nullptr;
    Check(api_, api_.GetTensorMutableData(out_v, &out_p), "writing the output");
    float* y = static_cast<float*>(out_p);
    std::fill(y, y + N * H, 0.f);
    if (N == 0) return;

    const auto* em = static_cast<const ExpertMeta*>(meta.data);
    const auto* xs = static_cast<const float*>(x.data);
    const auto* idx = static_cast<const int64_t*>(ti.data);
    const auto* wts = static_cast<const float*>(tw.data);
    const auto* cb = static_cast<const uint8_t*>(codes.data);
    const auto* sb = static_cast<const uint16_t*>(scales.data);
    const auto* zb = static_cast<const uint8_t*>(zeros.data);
    const int64_t hb = H / block_, ib = I / block_;

    // The experts' extents, checked once per call (cheap: E rows).
    for (int64_t e = 0; e < E; ++e) {
      const ExpertMeta& m = em[e];
      if (m.bits == 0) continue;
      if (m.bits != 2 && m.bits != 4 && m.bits != 8) Fail("expert " + std::to_string(e) + " has unsupported bits");
      const int64_t gu_c = 2 * I * H * m.bits / 8, dn_c = H * I * m.bits / 8;
      if (m.gu_codes < 0 || m.gu_codes + gu_c > codes.size() || m.down_codes < 0 || m.down_codes + dn_c > codes.size() ||
          m.gu_scales < 0 || m.gu_scales + 2 * I * hb > scales.size() || m.down_scales < 0 ||
          m.down_scales + H * ib > scales.size() || m.gu_zeros < 0 || m.gu_zeros + 2 * I * hb > zeros.size() ||
          m.down_zeros < 0 || m.down_zeros + H * ib > zeros.size())
        Fail("expert " + std::to_string(e) + "'s offsets run past its tensors");
    }

    // Rows per expert, in row order (the interpreter's order within an expert).
    std::vector<int64_t> count(E + 1, 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j) {
        int64_t e = idx[n * k + j];
        if (e < 0 || e >= E) Fail("top_i holds expert " + std::to_string(e) + " outside [0, " + std::to_string(E) + ")");
        if (em[e].bits) ++count[e + 1];
      }
    for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
    const int64_t S = count[E];
    if (S == 0) return;
    std::vector<int64_t> slot_row(S), fill(count.begin(), count.end() - 1);
    std::vector<float> slot_w(S);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < k; ++j) {
        int64_t e = idx[n * k + j];
        if (!em[e].bits) continue;
        int64_t s = fill[e]++;
        slot_row[s] = n;
        slot_w[s] = wts[n * k + j];
      }
    std::vector<int64_t> active;
    for (int64_t e = 0; e < E; ++e)
      if (count[e + 1] > count[e]) active.push_back(e);

    auto run = [&](int jobs, auto&& f) { RunJobs(api_, ctx, jobs, f); };
    const DotFn dot = ChosenDot();
    const QuantFn quantize = ChosenQuantize();
    const SiluFn silu_mul = ChosenSilu();
    const bool q = level_ == 4;
    const int bs = static_cast<int>(block_);

    // The input rows, prepared once.
    std::vector<int8_t> xq(q ? N * H : 0);
    std::vector<float> xsa(q ? N * hb : 0), xsq(q ? N * hb : 0);
    std::vector<Act> xacts(N);
    run(static_cast<int>(N), [&](int n) {
      if (q) {
        quantize(xs + n * H, static_cast<int>(H), bs, &xq[n * H], &xsa[n * hb], &xsq[n * hb]);
        xacts[n] = Act{&xq[n * H], &xsa[n * hb], &xsq[n * hb], nullptr};
      } else {
        xacts[n] = Act{nullptr, nullptr, nullptr, xs + n * H};
      }
    });

    // Gate and up: h[slot] = silu(gate x) * up x, jobs of (expert, 64 rows of I).
    std::vector<float> h(S * I);
    const int64_t row_jobs = (I + kRowsPerJob - 1) / kRowsPerJob;
    run(static_cast<int>(active.size() * row_jobs), [&](int job) {
      const int64_t e = active[job / row_jobs], r0 = (job % row_jobs) * kRowsPerJob,
                    r1 = std::min<int64_t>(I, r0 + kRowsPerJob);
      const ExpertMeta& m = em[e];
      const int bits = static_cast<int>(m.bits);
      const int64_t pcodes = kPanel * H * bits / 8, pblocks = kPanel * hb;
      const Act* acts[kTile];
      float g[kTile * kPanel], u[kTile * kPanel];
      for (Tiles tl(count[e], count[e + 1]); tl.more(); tl.next()) {
        const int64_t s0 = tl.s0;
        const int nt = tl.nt;
        for (int t = 0; t < nt; ++t) acts[t] = &xacts[slot_row[s0 + t]];
        for (int64_t r = r0; r < r1; r += kPanel) {
          const int64_t gp = r / kPanel, up_p = (I + r) / kPanel;
          Panel gate{cb + m.gu_codes + gp * pcodes, sb + m.gu_scales + gp * pblocks, zb + m.gu_zeros + gp * pblocks};
          Panel up{cb + m.gu_codes + up_p * pcodes, sb + m.gu_scales + up_p * pblocks, zb + m.gu_zeros + up_p * pblocks};
          dot(gate, bits, static_cast<int>(H), bs, acts, nt, g);
          dot(up, bits, static_cast<int>(H), bs, acts, nt, u);
          for (int t = 0; t < nt; ++t) silu_mul(g + t * kPanel, u + t * kPanel, &h[(s0 + t) * I + r]);
        }
      }
    });

    // The intermediate rows, prepared for the down projections.
    std::vector<int8_t> hq(q ? S * I : 0);
    std::vector<float> hsa(q ? S * ib : 0), hsq(q ? S * ib : 0);
    std::vector<Act> hacts(S);
    run(static_cast<int>(S), [&](int s) {
      if (q) {
        quantize(&h[s * I], static_cast<int>(I), bs, &hq[s * I], &hsa[s * ib], &hsq[s * ib]);
        hacts[s] = Act{&hq[s * I], &hsa[s * ib], &hsq[s * ib], nullptr};
      } else {
        hacts[s] = Act{nullptr, nullptr, nullptr, &h[s * I]};
      }
    });

    // Down: jobs of 64 output columns; each adds its experts in ascending order.
    const int64_t col_jobs = (H + kRowsPerJob - 1) / kRowsPerJob;
    run(static_cast<int>(col_jobs), [&](int job) {
      const int64_t c0 = job * kRowsPerJob, c1 = std::min<int64_t>(H, c0 + kRowsPerJob);
      const Act* acts[kTile];
      float d[kTile * kPanel];
      for (int64_t e : active) {
        const ExpertMeta& m = em[e];
        const int bits = static_cast<int>(m.bits);
        const int64_t pcodes = kPanel * I * bits / 8, pblocks = kPanel * ib;
        for (Tiles tl(count[e], count[e + 1]); tl.more(); tl.next()) {
          const int64_t s0 = tl.s0;
          const int nt = tl.nt;
          for (int t = 0; t < nt; ++t) acts[t] = &hacts[s0 + t];
          for (int64_t c = c0; c < c1; c += kPanel) {
            const int64_t dp = c / kPanel;
            Panel down{cb + m.down_codes + dp * pcodes, sb + m.down_scales + dp * pblocks, zb + m.down_zeros + dp * pblocks};
            dot(down, bits, static_cast<int>(I), bs, acts, nt, d);
            for (int t = 0; t < nt; ++t) {
              float* yr = y + slot_row[s0 + t] * H + c;
              const float w = slot_w[s0 + t];
              for (int i = 0; i < kPanel; ++i) yr[i] += w * d[t * kPanel + i];
            }
          }
        }
      }
    });
  }

 private:
  int64_t Attr(const dmpq_ort::OrtKernelInfo* info, const char* name) { return IntAttr(api_, info, name, "MixedMoE"); }

  Api api_;
  int64_t hidden_ = 0, inter_ = 0, block_ = 0, level_ = 0;
};

const dmpq_ort::ElementType MixedMoE::kInputs[7] = {dmpq_ort::kFloat, dmpq_ort::kInt64, dmpq_ort::kFloat,
                                                    dmpq_ort::kUInt8, dmpq_ort::kFloat16, dmpq_ort::kUInt8,
                                                    dmpq_ort::kInt64};

// `ai.dmpq.PanelMatMul`: y = x W^T for one quantized projection (attention's, the LM head) in the same
// 16-row panels, with the same dot products, as MixedMoE's experts.
//   0 x      float   [..., K]
//   1 codes  uint8   [N * K * bits / 8]   the weight's codes in panels (N multiple of 16)
//   2 scales float16 [N * K / block]      block scales, per panel and block the 16 rows side by side
//   3 zeros  uint8   [N * K / block]      block zero points, one byte each, laid out as the scales
// Attributes: K, N, bits (2, 4, 8), block_size (a multiple of 64 dividing K), accuracy_level (0 or 4).
// Output float [..., N]. Jobs are (64 output columns, 64 rows of x): each output element is one dot product,
// so the result does not depend on the threads.
class PanelMatMul {
 public:
  static constexpr const char* kName = "PanelMatMul";
  static constexpr size_t kInputCount = 4;
  static constexpr size_t kOutputCount = 1;
  static const dmpq_ort::ElementType kInputs[4];

  PanelMatMul(const Api& api, const dmpq_ort::OrtKernelInfo* info) : api_(api) {
    k_ = IntAttr(api_, info, "K", kName);
    n_ = IntAttr(api_, info, "N", kName);
    bits_ = IntAttr(api_, info, "bits", kName);
    block_ = IntAttr(api_, info, "block_size", kName);
    level_ = IntAttr(api_, info, "accuracy_level", kName);
    auto fail = [](const std::string& m) { Fail(kName, m); };
    if (k_ <= 0 || n_ <= 0 || n_ % kPanel) fail("K must be positive and N a positive multiple of 16");
    if (bits_ != 2 && bits_ != 4 && bits_ != 8) fail("bits must be 2, 4 or 8");
    if (block_ < kGroup || block_ % kGroup || k_ % block_) fail("block_size must be a multiple of 64 dividing K");
    if (level_ != 0 && level_ != 4) fail("accuracy_level must be 0 (fp32 activations) or 4 (int8)");
  }

  void Compute(dmpq_ort::OrtKernelContext* ctx) {
    auto fail = [](const std::string& m) { Fail(kName, m); };
    Tensor in[4];
    ReadInputs(api_, ctx, 4, kName, in);
    const Tensor &x = in[0], &codes = in[1], &scales = in[2], &zeros = in[3];
    const int64_t K = k_, N = n_, kb = K / block_;
    if (x.dims.empty() || x.dims.back() != K) fail("x's last dimension must be K = " + std::to_string(K));
    if (codes.size() != N * K * bits_ / 8 || scales.size() != N * kb || zeros.size() != N * kb)
      fail("codes, scales and zeros must hold N * K * bits / 8, N * K / block_size and N * K / block_size values");
    const int64_t M = x.size() / K;
    std::vector<int64_t> dims = x.dims;
    dims.back() = N;
    dmpq_ort::OrtValue* out_v = nullptr;
    Check(api_, api_.KernelContextGetOutput(ctx, 0, dims.data(), dims.size(), &out_v), "making the output", kName);
    void* out_p = nullptr;
    Check(api_, api_.GetTensorMutableData(out_v, &out_p), "writing the output", kName);
    float* y = static_cast<float*>(out_p);
    if (M == 0) return;
    const auto* xs = static_cast<const float*>(x.data);
    const auto* cb = static_cast<const uint8_t*>(codes.data);
    const auto* sb = static_cast<const uint16_t*>(scales.data);
    const auto* zb = static_cast<const uint8_t*>(zeros.data);
    auto run = [&](int jobs, auto&& f) { RunJobs(api_, ctx, jobs, f); };
    const DotFn dot = ChosenDot();
    const QuantFn quantize = ChosenQuantize();
    const bool q = level_ == 4;
    const int bs = static_cast<int>(block_), bits = static_cast<int>(bits_);

    std::vector<int8_t> xq(q ? M * K : 0);
    std::vector<float> xsa(q ? M * kb : 0), xsq(q ? M * kb : 0);
    std::vector<Act> acts(M);
    run(static_cast<int>(M), [&](int m) {
      if (q) {
        quantize(xs + m * K, static_cast<int>(K), bs, &xq[m * K], &xsa[m * kb], &xsq[m * kb]);
        acts[m] = Act{&xq[m * K], &xsa[m * kb], &xsq[m * kb], nullptr};
      } else {
        acts[m] = Act{nullptr, nullptr, nullptr, xs + m * K};
      }
    });

    const int64_t col_jobs = (N + kRowsPerJob - 1) / kRowsPerJob, row_jobs = (M + kRowsPerJob - 1) / kRowsPerJob;
    const int64_t pcodes = kPanel * K * bits / 8, pblocks = kPanel * kb;
    run(static_cast<int>(col_jobs * row_jobs), [&](int job) {
      const int64_t c0 = (job / row_jobs) * kRowsPerJob, c1 = std::min<int64_t>(N, c0 + kRowsPerJob);
      const int64_t m0 = (job % row_jobs) * kRowsPerJob, m1 = std::min<int64_t>(M, m0 + kRowsPerJob);
      const Act* tile[kTile];
      float d[kTile * kPanel];
      for (int64_t c = c0; c < c1; c += kPanel) {  // a panel stays in L1 while every tile of rows runs on it
        const int64_t p = c / kPanel;
        const Panel panel{cb + p * pcodes, sb + p * pblocks, zb + p * pblocks};
        for (Tiles tl(m0, m1); tl.more(); tl.next()) {
          for (int t = 0; t < tl.nt; ++t) tile[t] = &acts[tl.s0 + t];
          dot(panel, bits, static_cast<int>(K), bs, tile, tl.nt, d);
          for (int t = 0; t < tl.nt; ++t) std::memcpy(y + (tl.s0 + t) * N + c, d + t * kPanel, kPanel * sizeof(float));
        }
      }
    });
  }

 private:
  Api api_;
  int64_t k_ = 0, n_ = 0, bits_ = 0, block_ = 0, level_ = 0;
};

const dmpq_ort::ElementType PanelMatMul::kInputs[4] = {dmpq_ort::kFloat, dmpq_ort::kUInt8, dmpq_ort::kFloat16,
                                                       dmpq_ort::kUInt8};

// ai.dmpq.GroupQueryAttention: onnxruntime-genai's KV contract with the attention core of gqa.h, which reads each
// KV head's rows once for all the query heads of its group (onnxruntime's CPU GroupQueryAttention reads them once
// per query head).
//
// Inputs
//   0 query         float  [B, T, heads * hd]      rotary already applied
//   1 key           float  [B, T, kv_heads * hd]   the new positions' keys (rotary applied) and values
//   2 value         float  [B, T, kv_heads * hd]
//   3 past_key      float  [B, kv_heads, P, hd]    positions [0, total - T) are the past; P >= total - T
//   4 past_value    float  [B, kv_heads, P, hd]
//   5 total         int64  [1] or []               past + T, the same for every row of the batch
//   6 bias          float  [B or 1, 1, T, total]   added to the scaled scores (padding, sliding window)
// Attributes: num_heads, kv_num_heads. The scale is 1 / sqrt(hd); attention is causal (row t attends
// positions [0, total - T + t]), the bias restricts it further.
// Outputs
//   0 output        float  [B, T, heads * hd]
//   1 present_key   float  [B, kv_heads, max(P, total), hd]: the past, then the new positions at [total - T, total)
//   2 present_value float  [B, kv_heads, max(P, total), hd]
// A present bound to the same memory as its past (genai's past_present_share_buffer: a buffer of the model's
// maximum length) is written in place: only the new rows; otherwise the past rows are copied first.
//
// Threads: the new rows' writes over (batch, KV head), then the attention over (batch, KV head, 16 query rows),
// which gqa.h runs over the keys in tiles: every output element is computed by one thread in a fixed order.
// gqa.h's path from the CPU's features alone (DMPQ_KERNEL_PATH forces the dot products' path, not this one):
// 2 AVX-512 (with AVX2 and FMA), 1 AVX2 + FMA, 0 portable.
int AttentionLevel() {
  static const int level = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
  }();
  return level;
}

class GroupQueryAttention {
 public:
  static constexpr const char* kName = "GroupQueryAttention";
  static constexpr size_t kInputCount = 7;
  static constexpr size_t kOutputCount = 3;
  static const dmpq_ort::ElementType kInputs[7];

  GroupQueryAttention(const Api& api, const dmpq_ort::OrtKernelInfo* info) : api_(api) {
    heads_ = IntAttr(api_, info, "num_heads", kName);
    kv_heads_ = IntAttr(api_, info, "kv_num_heads", kName);
    if (heads_ <= 0 || kv_heads_ <= 0 || heads_ % kv_heads_)
      Fail(kName, "num_heads must be a positive multiple of kv_num_heads");
  }

  void Compute(dmpq_ort::OrtKernelContext* ctx) {
    auto fail = [](const std::string& m) { Fail(kName, m); };
    Tensor in[7];
    ReadInputs(api_, ctx, 7, kName, in);
    const Tensor &q = in[0], &k = in[1], &v = in[2], &pk = in[3], &pv = in[4], &tot = in[5], &bias = in[6];
    if (q.dims.size() != 3 || q.dims[2] % heads_ || q.dims[2] == 0)
      fail("query must be [batch, tokens, num_heads * head_dim]");
    const int64_t B = q.dims[0], T = q.dims[1], nh = heads_, nkv = kv_heads_, hd = q.dims[2] / heads_;
    if (k.dims != std::vector<int64_t>{B, T, nkv * hd} || v.dims != k.dims)
      fail("key and value must be [batch, tokens, kv_num_heads * head_dim], the query's batch, tokens and head_dim");
    if (pk.dims.size() != 4 || pk.dims[0] != B || pk.dims[1] != nkv || pk.dims[3] != hd || pv.dims != pk.dims)
      fail("past_key and past_value must be [batch, kv_num_heads, length, head_dim]");
    if (tot.size() != 1) fail("total must hold one value (past + new positions)");
    const int64_t total = *static_cast<const int64_t*>(tot.data), past = total - T, P = pk.dims[2];
    if (past < 0 || past > P)
      fail("total (" + std::to_string(total) + ") must be the past's length plus the " + std::to_string(T) +
           " new positions, with the past within past_key's " + std::to_string(P) + " positions");
    if (bias.dims.size() != 4 || (bias.dims[0] != 1 && bias.dims[0] != B) || bias.dims[1] != 1 ||
        bias.dims[2] != T || bias.dims[3] != total)
      fail("bias must be [batch or 1, 1, tokens, total]");
    const int64_t cap = std::max(P, total);
    float* out = Output(ctx, 0, {B, T, nh * hd});
    float* present[2] = {Output(ctx, 1, {B, nkv, cap, hd}), Output(ctx, 2, {B, nkv, cap, hd})};
    if (B == 0 || T == 0) return;
    const float* pasts[2] = {static_cast<const float*>(pk.data), static_cast<const float*>(pv.data)};
    const float* news[2] = {static_cast<const float*>(k.data), static_cast<const float*>(v.data)};
    auto run = [&](int64_t jobs, auto&& f) { RunJobs(api_, ctx, static_cast<int>(jobs), f); };
    run(B * nkv, [&](int job) {  // the past (unless shared) and the new rows into present
      const int64_t b = job / nkv, h = job % nkv;
      for (int kv = 0; kv < 2; ++kv) {
        float* dst = present[kv] + (b * nkv + h) * cap * hd;
        if (present[kv] != pasts[kv] && past > 0)
          std::memcpy(dst, pasts[kv] + (b * nkv + h) * P * hd, static_cast<size_t>(past * hd) * sizeof(float));
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(dst + (past + t) * hd, news[kv] + ((b * T + t) * nkv + h) * hd, hd * sizeof(float));
      }
    });
    const int group = static_cast<int>(nh / nkv), dim = static_cast<int>(hd);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    const int level = hd % 16 == 0 ? AttentionLevel() : hd % 8 == 0 ? std::min(1, AttentionLevel()) : 0;
    const auto* qs = static_cast<const float*>(q.data);
    const auto* bs = static_cast<const float*>(bias.data);
    // a prompt's keys transposed once per KV head (gqa.h's TileScores): worth it once a head's queries are many
    const bool transpose = T * group >= 64;
    const int64_t ldt = (total + dmpq_gqa::kBlockTile - 1) / dmpq_gqa::kBlockTile * dmpq_gqa::kBlockTile;
    std::vector<float> kt(transpose ? static_cast<size_t>(B * nkv * hd * ldt) : 0);
    if (transpose)
      run(B * nkv, [&](int job) {
        dmpq_gqa::TransposeKeys(present[0] + job * cap * hd, total, dim, ldt, kt.data() + job * hd * ldt);
      });
    constexpr int64_t kRowsPerJob = 16;
    const int64_t blocks = (T + kRowsPerJob - 1) / kRowsPerJob;
    run(B * nkv * blocks, [&](int job) {
      const int64_t b = job / (nkv * blocks), h = job / blocks % nkv, t0 = job % blocks * kRowsPerJob;
      const int64_t rows = std::min(T, t0 + kRowsPerJob) - t0;
      std::vector<float> scratch(dmpq_gqa::ScratchFloats(rows, group, dim));
      const int64_t at = (b * nkv + h) * cap * hd, row = (b * T + t0) * nh + h * group;  // the block's first head
      const dmpq_gqa::Rows r{qs + row * hd, nh * hd, present[0] + at, present[1] + at, rows, past + t0 + 1,
                             bs + ((bias.dims[0] == 1 ? 0 : b) * T + t0) * total, total, out + row * hd,
                             scratch.data(), transpose ? kt.data() + (b * nkv + h) * hd * ldt : nullptr, ldt};
      // subnormals as zero in this job (flush-to-zero, denormals-are-zero: the thread's setting is restored
      // after): products with subnormal weights take the CPU's slow path, and they cannot change an output
      const unsigned int csr = _mm_getcsr();
      _mm_setcsr(csr | 0x8040);
      if (level == 2) {
        dmpq_gqa::Attend<dmpq_gqa::Avx512>(r, group, dim, scale);
      } else if (level == 1) {
        dmpq_gqa::Attend<dmpq_gqa::Avx2>(r, group, dim, scale);
      } else {
        dmpq_gqa::Attend<dmpq_gqa::Portable>(r, group, dim, scale);
      }
      _mm_setcsr(csr);
    });
  }

 private:
  float* Output(dmpq_ort::OrtKernelContext* ctx, size_t i, std::vector<int64_t> dims) {
    dmpq_ort::OrtValue* value = nullptr;
    Check(api_, api_.KernelContextGetOutput(ctx, i, dims.data(), dims.size(), &value), "making an output", kName);
    void* p = nullptr;
    Check(api_, api_.GetTensorMutableData(value, &p), "writing an output", kName);
    return static_cast<float*>(p);
  }

  Api api_;
  int64_t heads_ = 0, kv_heads_ = 0;
};

const dmpq_ort::ElementType GroupQueryAttention::kInputs[7] = {
    dmpq_ort::kFloat, dmpq_ort::kFloat, dmpq_ort::kFloat, dmpq_ort::kFloat, dmpq_ort::kFloat, dmpq_ort::kInt64,
    dmpq_ort::kFloat};

// The custom-op records.
template <class Kernel>
dmpq_ort::OrtCustomOpV8 MakeOp() {
  dmpq_ort::OrtCustomOpV8 op{};
  op.version = 8;
  op.CreateKernel = [](dmpq_ort::OrtCustomOpV8*, const ApiTable* api, const dmpq_ort::OrtKernelInfo* info) -> void* {
    return new Kernel(Api(api), info);
  };
  op.GetName = [](dmpq_ort::OrtCustomOpV8*) { return Kernel::kName; };
  op.GetExecutionProviderType = [](dmpq_ort::OrtCustomOpV8*) -> const char* { return nullptr; };
  op.GetInputType = [](dmpq_ort::OrtCustomOpV8*, size_t i) { return Kernel::kInputs[i]; };
  op.GetInputTypeCount = [](dmpq_ort::OrtCustomOpV8*) -> size_t { return Kernel::kInputCount; };
  op.GetOutputType = [](dmpq_ort::OrtCustomOpV8*, size_t) { return dmpq_ort::kFloat; };
  op.GetOutputTypeCount = [](dmpq_ort::OrtCustomOpV8*) -> size_t { return Kernel::kOutputCount; };
  op.KernelCompute = [](void* k, dmpq_ort::OrtKernelContext* ctx) { static_cast<Kernel*>(k)->Compute(ctx); };
  op.KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  op.GetInputCharacteristic = [](const dmpq_ort::OrtCustomOpV8*, size_t) { return dmpq_ort::kRequired; };
  op.GetOutputCharacteristic = [](const dmpq_ort::OrtCustomOpV8*, size_t) { return dmpq_ort::kRequired; };
  return op;
}

dmpq_ort::OrtCustomOpV8 g_moe_op = MakeOp<MixedMoE>();
dmpq_ort::OrtCustomOpV8 g_matmul_op = MakeOp<PanelMatMul>();
dmpq_ort::OrtCustomOpV8 g_gqa_op = MakeOp<GroupQueryAttention>();

// onnxruntime's own threads where it offers them (1.17 on) unless DMPQ_KERNEL_POOL=own.
bool UseOrtPool(const char* version) {
  const char* env = std::getenv("DMPQ_KERNEL_POOL");
  if (env && std::string(env) == "own") return false;
  int major = 0, minor = 0;
  if (!version || std::sscanf(version, "%d.%d", &major, &minor) != 2) return false;
  return major > 1 || (major == 1 && minor >= 17);
}

// The function table is positional: check three entries on a status we make before trusting it.
bool SelfCheck(const Api& api) {
  const char* probe = "dmpq-abi-check";
  dmpq_ort::OrtStatus* st = api.CreateStatus(2, probe);
  if (!st) return false;
  bool ok = api.GetErrorCode(st) == 2 && std::strcmp(api.GetErrorMessage(st), probe) == 0;
  api.ReleaseStatus(st);
  return ok;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) dmpq_ort::OrtStatus* RegisterCustomOps(dmpq_ort::OrtSessionOptions* options,
                                                                               const dmpq_ort::ApiBase* base) {
  const ApiTable* table = base->GetApi(1);
  if (!table) return nullptr;  // cannot happen: every onnxruntime serves version 1
  Api api(table);
  if (!SelfCheck(api)) return api.CreateStatus(1, "dmpq kernels: onnxruntime's C API table is not the one expected");
  if (!Path().error.empty()) return api.CreateStatus(1, ("dmpq kernels: " + Path().error).c_str());
  g_ort_pool.store(UseOrtPool(base->GetVersionString()));
  dmpq_ort::OrtCustomOpDomain* domain = nullptr;
  if (dmpq_ort::OrtStatus* st = api.CreateCustomOpDomain("ai.dmpq", &domain)) return st;
  if (dmpq_ort::OrtStatus* st = api.CustomOpDomainAdd(domain, &g_moe_op)) return st;
  if (dmpq_ort::OrtStatus* st = api.CustomOpDomainAdd(domain, &g_matmul_op)) return st;
  if (dmpq_ort::OrtStatus* st = api.CustomOpDomainAdd(domain, &g_gqa_op)) return st;
  return api.AddCustomOpDomain(options, domain);  // the domain lives as long as the process
}

// For Python (ctypes): which dot-product path this CPU gets, and the pool's thread count.
// The path is "" when DMPQ_KERNEL_PATH forces one this CPU lacks or names none; dmpq_kernel_path_error says why.
__attribute__((visibility("default"))) const char* dmpq_kernel_path() { return Path().name; }
__attribute__((visibility("default"))) const char* dmpq_kernel_path_error() { return Path().error.c_str(); }
__attribute__((visibility("default"))) int dmpq_kernel_threads() { return DefaultThreads(); }
__attribute__((visibility("default"))) int dmpq_kernel_uses_ort_pool() { return g_ort_pool.load() ? 1 : 0; }

}  // extern "C"
