/* y = x @ w^T (+ b) for a few rows of x: the decode step's matrix products.
 *
 * While sampling, every linear layer multiplies k (~16) rows by a weight matrix that is read
 * from memory once per step, so the step is bound by how fast the weights stream. MKL's sgemm
 * packs the weight matrix on every call for so few rows and reaches ~3-8 GB/s here, a fraction
 * of the memory bandwidth. This kernel reads w in its nn.Linear layout [N, K] exactly once:
 * a block of 3 weight rows stays in L1 while it meets every row of x (L2), 4 rows at a time,
 * in 12 vector accumulators (3 weight loads + 4 x loads per 12 FMAs; AVX-512: 6 weight rows,
 * below). Only the first of those passes needs memory, so every pass also prefetches a share of
 * the next block's weight rows: memory keeps streaming while the block is re-read from L1
 * (1.07-1.20x at 16 rows on Qwen's layers but down_proj, 0.95x there, on the AVX2 EPYC:
 * `python -m bench.kernel --against 95cf529`).
 *
 * Built by rlsc/decoding.py with the system C compiler on first use; OpenMP resolves to the
 * libgomp torch has already loaded, so both share one thread pool.
 *
 * Where the CPU has AVX-512, rlsc/decoding.py adds -mavx512f and the same loops run on 16-float
 * registers, with the block widened to 6 weight rows (24 of the 32 registers accumulate), each x
 * row pinned in a register (else GCC folds the x load into every FMA: 3 loads where 1 does) and
 * the next block fetched into L2 rather than L1 (the 6-row block fills L1). Measured on a 2-core
 * AVX-512 Xeon at 16 rows, weights streaming from memory: 18.3-20.3 GB/s against 13.7-14.3 for the
 * AVX2 source and 8.1-11.8 for torch (`python -m bench.kernel --against f39ddb4`, bench/RESULTS.md). The AVX2 build keeps the 4 x 3 block that was
 * measured best on an AVX2-only EPYC (16 registers: 12 accumulate).
 */
#include <immintrin.h>
#include <stdint.h>

/* the vector type the loops run on: VW floats, loaded, multiplied-added and summed; the block
 * (MB rows of x against NB weight rows) and the prefetch's cache level, per instruction set */
#ifdef __AVX512F__
typedef __m512 vec;
#define VW 16
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vfmadd _mm512_fmadd_ps
#define NB 6
#define MB 4
#define PF_HINT _MM_HINT_T1
#define PIN(v) __asm__("" : "+v"(v))
static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 vec;
#define VW 8
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vfmadd _mm256_fmadd_ps
#define NB 3
#define MB 4
#define PF_HINT _MM_HINT_T0
#define PIN(v) ((void)0)
static inline float hsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* the full 4 x 3 block: rows m0..m0+3 of x against weight rows n0..n0+2, prefetching npf cache
 * lines from pf on the way (loops with constant bounds: the compiler unrolls them) */
static void block_full(const float *x, int64_t ldx, const float *w, int64_t K, float *y, int64_t ldy,
                       int64_t m0, int64_t n0, const char *pf, int64_t npf) {
    vec acc[MB][NB];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = vzero();
    const float *xs[MB], *ws[NB];
    for (int i = 0; i < MB; i++) xs[i] = x + (m0 + i) * ldx;
    for (int c = 0; c < NB; c++) ws[c] = w + (n0 + c) * K;
    int64_t k = 0;
    int64_t j = 0;
    for (; k + VW <= K; k += VW) {
        if (j < npf) { _mm_prefetch(pf + 64 * j, PF_HINT); j++; }
        vec wv[NB];
        for (int c = 0; c < NB; c++) wv[c] = vload(ws[c] + k);
        for (int i = 0; i < MB; i++) {
            vec v = vload(xs[i] + k);
            PIN(v);
            for (int c = 0; c < NB; c++) acc[i][c] = vfmadd(v, wv[c], acc[i][c]);
        }
    }
    for (; j < npf; j++) _mm_prefetch(pf + 64 * j, PF_HINT);
    for (int i = 0; i < MB; i++)
        for (int c = 0; c < NB; c++) {
            float s = hsum(acc[i][c]);
            for (int64_t t = k; t < K; t++) s += xs[i][t] * ws[c][t];
            y[(m0 + i) * ldy + n0 + c] = s;
        }
}

/* any smaller block at the edges: one accumulator per (row, weight row) */
static void block_edge(const float *x, int64_t ldx, const float *w, int64_t K, float *y, int64_t ldy,
                       int64_t m0, int64_t mm, int64_t n0, int64_t nn) {
    for (int64_t i = m0; i < m0 + mm; i++)
        for (int64_t j = n0; j < n0 + nn; j++) {
            const float *xr = x + i * ldx, *wr = w + j * K;
            vec acc = vzero();
            int64_t k = 0;
            for (; k + VW <= K; k += VW) acc = vfmadd(vload(xr + k), vload(wr + k), acc);
            float s = hsum(acc);
            for (; k < K; k++) s += xr[k] * wr[k];
            y[i * ldy + j] = s;
        }
}

/* x [M, K] with row stride ldx; w [N, K] contiguous; b [N] or NULL; y [M, N] contiguous */
void rlsc_skinny_linear(const float *x, int64_t ldx, const float *w, const float *b, float *y,
                        int64_t M, int64_t N, int64_t K, int threads) {
    int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < blocks; nb++) {
        int64_t n0 = nb * NB, nn = N - n0 < NB ? N - n0 : NB;
        int64_t m0 = 0, passes = M / MB;
        /* the next block's weight rows, fetched a share per pass while this block is re-read from L1 */
        int64_t next = n0 + NB, lines = next < N ? ((N - next < NB ? N - next : NB) * K * 4 + 63) / 64 : 0;
        const char *pf = lines ? (const char *)(w + next * K) : (const char *)w;
        int64_t p = 0;  /* the pass: which share of the next block to prefetch */
        for (; m0 + MB <= M; m0 += MB, p++) {
            int64_t a = lines * p / passes, e = lines * (p + 1) / passes;
            if (nn == NB) block_full(x, ldx, w, K, y, N, m0, n0, pf + 64 * a, e - a);
            else block_edge(x, ldx, w, K, y, N, m0, MB, n0, nn);
        }
        if (m0 < M) block_edge(x, ldx, w, K, y, N, m0, M - m0, n0, nn);
        if (b)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = n0; j < n0 + nn; j++) y[i * N + j] += b[j];
    }
}
