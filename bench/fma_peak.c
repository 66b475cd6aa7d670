/* The machine's fp32 FMA peak: each thread runs 12 independent chains of fused multiply-adds on the
 * widest registers the kernel is built for (AVX-512's 16 floats under -mavx512f, else AVX2's 8;
 * 12 chains cover the FMA latency on both FMA pipes), no memory traffic. The ceiling any matmul
 * kernel here can reach; bench/kernel.py reports the decode kernel against it. */
#include <immintrin.h>
#include <omp.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define VW 16
#define vset1 _mm512_set1_ps
#define vfmadd _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vstore _mm512_storeu_ps
#else
typedef __m256 vec;
#define VW 8
#define vset1 _mm256_set1_ps
#define vfmadd _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vstore _mm256_storeu_ps
#endif

/* the float lanes one FMA instruction works on in this build */
int rlsc_fma_lanes(void) { return VW; }

double rlsc_fma_peak_gflops(int threads, long iterations) {
    float sink = 0.0f;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        vec acc[12];
        const vec scale = vset1(1.0000001f), shift = vset1(1e-7f);
        for (int i = 0; i < 12; i++) acc[i] = vset1((float)i);
        for (long it = 0; it < iterations; it++)
            for (int i = 0; i < 12; i++) acc[i] = vfmadd(acc[i], scale, shift);
        vec total = acc[0];
        for (int i = 1; i < 12; i++) total = vadd(total, acc[i]);
        float lanes[VW];
        vstore(lanes, total);
        sink += lanes[0]; /* keeps the chains from being optimised away */
    }
    double seconds = omp_get_wtime() - start;
    return sink == 0.12345f ? 0.0 : threads * (double)iterations * 12 * VW * 2 / seconds / 1e9; /* lanes x 2 FLOPs */
}
