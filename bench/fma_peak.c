/* The machine's fp32 FMA peak: each thread runs 12 independent chains of AVX2 fused multiply-adds
 * (enough to cover the FMA latency on both FMA pipes), no memory traffic. The ceiling any matmul
 * kernel here can reach; bench/kernel.py reports the decode kernel against it. */
#include <immintrin.h>
#include <omp.h>

double rlsc_fma_peak_gflops(int threads, long iterations) {
    float sink = 0.0f;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m256 acc[12];
        const __m256 scale = _mm256_set1_ps(1.0000001f), shift = _mm256_set1_ps(1e-7f);
        for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_ps((float)i);
        for (long it = 0; it < iterations; it++)
            for (int i = 0; i < 12; i++) acc[i] = _mm256_fmadd_ps(acc[i], scale, shift);
        __m256 total = acc[0];
        for (int i = 1; i < 12; i++) total = _mm256_add_ps(total, acc[i]);
        float lanes[8];
        _mm256_storeu_ps(lanes, total);
        sink += lanes[0]; /* keeps the chains from being optimised away */
    }
    double seconds = omp_get_wtime() - start;
    return sink == 0.12345f ? 0.0 : threads * (double)iterations * 12 * 16 / seconds / 1e9; /* 8 lanes x 2 FLOPs */
}
