/* y = x @ w^T (+ b) for a few rows of x: the decode step's matrix products.
 *
 * While sampling, every linear layer multiplies k (~16) rows by a weight matrix that is read
 * from memory once per step, so the step is bound by how fast the weights stream. MKL's sgemm
 * packs the weight matrix on every call for so few rows and reaches ~3-8 GB/s here, a fraction
 * of the memory bandwidth. This kernel reads w in its nn.Linear layout [N, K] exactly once:
 * a block of 3 weight rows stays in L1 while it meets every row of x (L2), 4 rows at a time,
 * in 12 AVX2 accumulators (3 weight loads + 4 x loads per 12 FMAs).
 *
 * Built by rlsc/decoding.py with the system C compiler on first use; OpenMP resolves to the
 * libgomp torch has already loaded, so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>

#define NB 3 /* weight rows per block */
#define MB 4 /* x rows per block */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the full 4 x 3 block: rows m0..m0+3 of x against weight rows n0..n0+2 */
static void block_full(const float *x, int64_t ldx, const float *w, int64_t K, float *y, int64_t ldy,
                       int64_t m0, int64_t n0) {
    __m256 acc[MB][NB];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K;
    const float *x0 = x + m0 * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k), c = _mm256_loadu_ps(w2 + k);
        __m256 v;
        v = _mm256_loadu_ps(x0 + k);
        acc[0][0] = _mm256_fmadd_ps(v, a, acc[0][0]); acc[0][1] = _mm256_fmadd_ps(v, b, acc[0][1]);
        acc[0][2] = _mm256_fmadd_ps(v, c, acc[0][2]);
        v = _mm256_loadu_ps(x1 + k);
        acc[1][0] = _mm256_fmadd_ps(v, a, acc[1][0]); acc[1][1] = _mm256_fmadd_ps(v, b, acc[1][1]);
        acc[1][2] = _mm256_fmadd_ps(v, c, acc[1][2]);
        v = _mm256_loadu_ps(x2 + k);
        acc[2][0] = _mm256_fmadd_ps(v, a, acc[2][0]); acc[2][1] = _mm256_fmadd_ps(v, b, acc[2][1]);
        acc[2][2] = _mm256_fmadd_ps(v, c, acc[2][2]);
        v = _mm256_loadu_ps(x3 + k);
        acc[3][0] = _mm256_fmadd_ps(v, a, acc[3][0]); acc[3][1] = _mm256_fmadd_ps(v, b, acc[3][1]);
        acc[3][2] = _mm256_fmadd_ps(v, c, acc[3][2]);
    }
    const float *xs[MB] = {x0, x1, x2, x3}, *ws[NB] = {w0, w1, w2};
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t t = k; t < K; t++) s += xs[i][t] * ws[j][t];
            y[(m0 + i) * ldy + n0 + j] = s;
        }
}

/* any smaller block at the edges: one accumulator per (row, weight row) */
static void block_edge(const float *x, int64_t ldx, const float *w, int64_t K, float *y, int64_t ldy,
                       int64_t m0, int64_t mm, int64_t n0, int64_t nn) {
    for (int64_t i = m0; i < m0 + mm; i++)
        for (int64_t j = n0; j < n0 + nn; j++) {
            const float *xr = x + i * ldx, *wr = w + j * K;
            __m256 acc = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(wr + k), acc);
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
        int64_t m0 = 0;
        for (; m0 + MB <= M; m0 += MB) {
            if (nn == NB) block_full(x, ldx, w, K, y, N, m0, n0);
            else block_edge(x, ldx, w, K, y, N, m0, MB, n0, nn);
        }
        if (m0 < M) block_edge(x, ldx, w, K, y, N, m0, M - m0, n0, nn);
        if (b)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = n0; j < n0 + nn; j++) y[i * N + j] += b[j];
    }
}
