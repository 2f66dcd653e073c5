"""This CPU's int8 dot-product peak per thread, in GMAC/s (one MAC: a u8 x s8 product added): ``vpdpbusd``
(AVX-512 VNNI, 512- and 256-bit) with 2-16 independent accumulators where the CPU has it, and on any AVX2 CPU
AVX2's int8 step, ``vpmaddubsw`` plus a 16-bit add (what dmpq's kernel and llama.cpp use without VNNI), with
4-8 accumulators.

Why: a kernel's or a peer's prefill implies a rate of expert products; above this peak times the threads, the
work it does is not the work assumed (llama.cpp's one-layer prefill implied 790 GMAC/s on two cores whose
peak this prints as about 235 each: it ran its only layer's MoE on one position; benchmarks/README.md,
"Mixtral-8x7B widths, two layers").

    python benchmarks/int8_peak.py            # needs g++ and a CPU with AVX2 (AVX-512 VNNI for its rows)

The loops are compiled here with ``-O2``, each for its instructions' target, and run where the CPU has them;
each configuration runs about 0.2 s on one thread.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from dmpq_compile.native import compiler
from dmpq_compile.sysinfo import cpu_flags, cpu_model

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2 __attribute__((target("avx2")))
// N independent accumulator chains; the multiplicands are shared (only the chains limit the issue rate)
template <int N> VNNI double Zmm(long iters) {
  __m512i acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
  auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m512i sum = acc[0];
  for (int i = 1; i < N; ++i) sum = _mm512_add_epi32(sum, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(sum);
  (void)sink;
  return iters * double(N) * 64 / s / 1e9;
}
template <int N> VNNI double Ymm(long iters) {
  __m256i acc[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
  auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) acc[i] = _mm256_dpbusd_epi32(acc[i], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m256i sum = acc[0];
  for (int i = 1; i < N; ++i) sum = _mm256_add_epi32(sum, acc[i]);
  volatile int sink = _mm256_extract_epi32(sum, 0);
  (void)sink;
  return iters * double(N) * 32 / s / 1e9;
}
// AVX2: u8 x s8 -> pairs summed to s16 (vpmaddubsw), added to N 16-bit accumulators; one multiplicand per
// chain, so that the compiler cannot share the products.
template <int N> AVX2 double Maddubs(long iters) {
  __m256i acc[N], b[N];
  for (int i = 0; i < N; ++i) acc[i] = _mm256_set1_epi16(i), b[i] = _mm256_set1_epi8(i + 1);
  __m256i a = _mm256_set1_epi8(3);
  auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(a, b[i]));
    asm volatile("" : "+x"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m256i sum = acc[0];
  for (int i = 1; i < N; ++i) sum = _mm256_add_epi16(sum, acc[i]);
  volatile int sink = _mm256_extract_epi16(sum, 0);
  (void)sink;
  return iters * double(N) * 32 / s / 1e9;
}
int main() {
  const long total = 200000000;
  if (__builtin_cpu_supports("avx2")) {
    std::printf("maddubs 4 %.1f\n", Maddubs<4>(total / 4));
    std::printf("maddubs 8 %.1f\n", Maddubs<8>(total / 8));
  }
  if (!__builtin_cpu_supports("avx512vnni")) return 0;
  std::printf("zmm 2 %.1f\n", Zmm<2>(total / 2));
  std::printf("zmm 4 %.1f\n", Zmm<4>(total / 4));
  std::printf("zmm 8 %.1f\n", Zmm<8>(total / 8));
  std::printf("zmm 16 %.1f\n", Zmm<16>(total / 16));
  std::printf("ymm 4 %.1f\n", Ymm<4>(total / 4));
  std::printf("ymm 8 %.1f\n", Ymm<8>(total / 8));
  std::printf("ymm 16 %.1f\n", Ymm<16>(total / 16));
}
"""


def main() -> int:
    if "avx2" not in cpu_flags():
        print("this CPU has no AVX2: nothing to measure", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cc", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([compiler("the int8 peak benchmark"), "-O2", "-std=c++17", "-o", str(exe),
                        str(src)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    print(f"{cpu_model()}, one thread; GMAC/s by instruction (vpdpbusd: zmm, ymm; vpmaddubsw + vpaddw: maddubs) "
          "and independent accumulators")
    for line in out.split("\n"):
        if line.strip():
            what, n, rate = line.split()
            print(f"  {what:8} x{int(n):<3} {float(rate):8.1f}")
    if "avx512_vnni" not in cpu_flags():
        print("  (no AVX-512 VNNI on this CPU: vpdpbusd not measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
