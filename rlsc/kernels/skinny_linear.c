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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* bf16 products on AMX tiles (sampling.precision = bf16, where the CPU has amx_bf16): the layer's
 * weight is a bf16 copy [N, K], read at half the bytes, and x is rounded to bf16 once per call.
 * One TDPBF16PS multiplies a 16 x 32 bf16 tile of weights by a 32 x 16 tile of x into 16 x 16
 * fp32 sums (8192 products, against 32 for an fp32 FMA), so the arithmetic no longer competes
 * with the weight stream: 1.8-2.5x the fp32 kernel's speed on Qwen's large layers at 16 rows,
 * 17-24 GB/s of bf16 weights (`python -m bench.kernel`, bench/RESULTS.md). The weight is the tile's A side as it
 * lies in memory (16 weight rows, 32 consecutive k each: C^T = W x^T), x is packed once per call
 * into the B side's pair layout, and each C^T tile (16 outputs x 16 rows of x) is transposed on
 * the way out. Needs K % 32 == 0 and N % 16 == 0 (every layer of the embedded models); rlsc/decoding.py
 * sends other shapes to torch's bf16 matmul. Sums are fp32; they differ from an fp32 product by the
 * rounding of x and w to bf16 (~3e-3 relative), not by the summation. */
#include <sys/syscall.h>
#include <unistd.h>
#define TILE 16                 /* rows of a tile; its 64-byte rows hold 32 bf16 or 16 fp32 */
#define AMX_NT 2                /* C tiles per task (tiles_task) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Linux hands a process the AMX state only on request; 1 when granted (once per process) */
int rlsc_amx_ready(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

static void configure_tiles(void) {
    struct tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = TILE; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* r[m] = 16 uint32 of row m -> r[p] = element p of every row: a 16 x 16 transpose in registers
 * (32-bit interleaves, then 64-bit, then 128-bit lanes across vectors) */
static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* lane j of u[4i + k]: element 4j + k of rows 4i .. 4i + 3 */
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {  /* element 4j + k of all rows = lane j of u[k], u[4 + k], u[8 + k], u[12 + k] */
        __m512i w0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), w1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
        __m512i w2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44), w3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        r[k] = _mm512_shuffle_i32x4(w0, w2, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
        r[8 + k] = _mm512_shuffle_i32x4(w1, w3, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
    }
}

/* x [M, K] fp32 (row stride ldx) -> xp [mblocks][K / 32][16 pairs][16 rows][2] bf16: B tiles, rounded
 * to nearest even as torch's cast, rows past M zero. Per 32 k: each row's values become 16 bf16
 * pairs in one conversion, and the 16 rows x 16 pairs are transposed in registers (was an
 * element-by-element loop, 6-9 ns per k and ~40% of a SmolLM2 decode call's fixed cost; ad hoc,
 * stop 17). */
static void pack_rows_for_tiles(const float *x, int64_t ldx, int64_t M, int64_t K, uint16_t *xp) {
    const int64_t chunks = K / 32, mblocks = (M + TILE - 1) / TILE;
    for (int64_t mb = 0; mb < mblocks; mb++)
        for (int64_t c = 0; c < chunks; c++) {
            __m512i r[TILE];
            for (int m = 0; m < TILE; m++) {
                const float *xr = x + (mb * TILE + m) * ldx + c * 32;
                r[m] = mb * TILE + m < M
                    ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + 16), _mm512_loadu_ps(xr))
                    : _mm512_setzero_si512();
            }
            transpose16x16(r);
            uint32_t *dst = (uint32_t *)xp + (mb * chunks + c) * TILE * TILE;
            for (int p = 0; p < TILE; p++) _mm512_storeu_si512(dst + p * TILE, r[p]);
        }
}

/* a C^T tile (16 outputs from n0 x 16 rows of x from m0) -> y rows m0.. below M, plus the bias:
 * column m of the tile is row m of the output, gathered 16 floats at a time */
static void store_transposed(const float *ct, const float *b, float *y, int64_t ldy, int64_t M, int64_t m0,
                             int64_t n0) {
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(TILE));
    const __m512 bias = b ? _mm512_loadu_ps(b + n0) : _mm512_setzero_ps();
    for (int64_t m = 0; m < TILE && m0 + m < M; m++)
        _mm512_storeu_ps(y + (m0 + m) * ldy + n0, _mm512_add_ps(_mm512_i32gather_ps(column, ct + m, 4), bias));
}

/* 32 weight rows from n0 (nt = 1 or 2 tiles of 16) against one 16-row block of packed x. Two C tiles
 * streamed 23-26 GB/s on Qwen's large layers at 16 rows; four (64 rows, 64 concurrent streams)
 * and software prefetch 2-8 chunks ahead were no better, mostly worse (ad hoc, stop 15). */
static void tiles_task(const uint16_t *w, const float *b, const uint16_t *xp_block, int64_t K, int64_t n0, int nt,
                       float *y, int64_t ldy, int64_t M, int64_t m0, float *scratch) {
    _tile_zero(0);
    _tile_zero(1);
    const int64_t stride = K * 2, chunks = K / 32;
    const char *a = (const char *)(w + n0 * K);
    for (int64_t c = 0; c < chunks; c++) {
        _tile_loadd(4, xp_block + c * TILE * TILE * 2, 64);
        _tile_loadd(5, a + c * 64, stride);
        _tile_dpbf16ps(0, 5, 4);
        if (nt > 1) {
            _tile_loadd(6, a + c * 64 + TILE * stride, stride);
            _tile_dpbf16ps(1, 6, 4);
        }
    }
    _tile_stored(0, scratch, 64);
    store_transposed(scratch, b, y, ldy, M, m0, n0);
    if (nt > 1) {
        _tile_stored(1, scratch, 64);
        store_transposed(scratch, b, y, ldy, M, m0, n0 + TILE);
    }
}

/* as rlsc_skinny_linear with w [N, K] bf16; scratch: mblocks * 16 * K bf16 (x packed) */
void rlsc_skinny_linear_amx(const float *x, int64_t ldx, const uint16_t *w, const float *b, float *y,
                            int64_t M, int64_t N, int64_t K, int threads, uint16_t *scratch) {
    uint16_t *xp = scratch;
    pack_rows_for_tiles(x, ldx, M, K, xp);
    int64_t mblocks = (M + TILE - 1) / TILE, tasks = (N + AMX_NT * TILE - 1) / (AMX_NT * TILE);
#pragma omp parallel num_threads(threads)
    {
        float ct[TILE * TILE];
        configure_tiles();
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t n0 = t * AMX_NT * TILE;
            int nt = (int)((N - n0) / TILE < AMX_NT ? (N - n0) / TILE : AMX_NT);
            for (int64_t mb = 0; mb < mblocks; mb++)
                tiles_task(w, b, xp + mb * (K / 32) * TILE * TILE * 2, K, n0, nt, y, N, M, mb * TILE, ct);
        }
        _tile_release();
    }
}
#endif
