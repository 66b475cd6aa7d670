/* The glue between a decode step's matrix products, for rlsc/decode_step.py: RMSNorm with the
 * residual add, attention of the step's one new position (rotary embedding, the key/value write,
 * scores against the prompt and the row's own completion, softmax, the mix of values), and the
 * gated MLP's SiLU(gate) * up; and, for rlsc/sampling.py, each step's draw and statistics (last
 * section).
 *
 * Why in C: with 16 rows a small model's decode step spent as long in this glue as in its weights.
 * Eager torch ran it as ~40 small operators per layer at 5-50 us each (SmolLM2-135M: ~18 ms of a
 * 35 ms bf16 step, 30 layers; bench/RESULTS.md); here it is 3 calls per layer. The products that
 * hold weights stay with the model's modules, or the decode kernels directly (rlsc/decode_step.py's
 * LayerPlan), so LoRA adapters still apply.
 *
 * Everything is fp32, contiguous unless a stride is given. Results agree with torch's to float
 * rounding (other summation orders), tested against the model's own forward
 * (tests/unit/test_decode_step.py). Built by rlsc/decoding.py like the kernel, for the same CPU
 * flags; the loops are written for the compiler to vectorise (`omp simd`), exp included: glibc's
 * vector expf (libmvec) is declared below as math.h declares it only under -ffast-math, which
 * would also drop IEEE infinities.
 */
#include <stdint.h>
#include <string.h>

float expf(float) __attribute__((simd("notinbranch")));
float sqrtf(float);
float logf(float);
double log(double);

/* h += delta (when delta is not NULL), then x = h / rms(h) * w: rows of width d */
void rlsc_add_rms_norm(float *h, const float *delta, const float *w, float eps, float *x, int64_t rows,
                       int64_t d) {
    for (int64_t r = 0; r < rows; r++) {
        float *hr = h + r * d, *xr = x + r * d;
        float squares = 0.0f;
        if (delta) {
            const float *dr = delta + r * d;
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < d; i++) {
                hr[i] += dr[i];
                squares += hr[i] * hr[i];
            }
        } else {
#pragma omp simd reduction(+ : squares)
            for (int64_t i = 0; i < d; i++) squares += hr[i] * hr[i];
        }
        const float scale = 1.0f / sqrtf(squares / (float)d + eps);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) xr[i] = hr[i] * scale * w[i];
    }
}

/* out = silu(gate) * up; gate and up rows with strides (both may be slices of one fused output) */
void rlsc_silu_mul(const float *gate, int64_t ld_gate, const float *up, int64_t ld_up, float *out, int64_t rows,
                   int64_t d, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * ld_gate, *u = up + r * ld_up;
        float *o = out + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* rotary embedding of one head vector, times `scale`: x*cos + roll(x, d/2)*signed_sin, where
 * signed_sin is sin with its first half negated (rotate_half(x) = (-x2, x1) = that roll's sign flip) */
static void rotate(const float *x, const float *cos, const float *signed_sin, float scale, float *out,
                   int64_t d) {
    const int64_t half = d / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) out[i] = (x[i] * cos[i] + x[i + half] * signed_sin[i]) * scale;
#pragma omp simd
    for (int64_t i = half; i < d; i++) out[i] = (x[i] * cos[i] + x[i - half] * signed_sin[i]) * scale;
}

/* 16 floats: GCC's vector extension, one AVX-512 register or two AVX2 ones (unaligned access) */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }

/* Query heads are taken QB at a time: each key or value vector loaded serves QB heads (the keys
 * and values of a kv head are re-read from L2 once per QB heads, not once per head), and the QB
 * accumulators are independent chains of multiply-adds. */
#define QB 4

static void store_scores(const v16 a[QB], int64_t width, float *scores, int64_t ld) {
    for (int g = 0; g < QB; g++) {
        float all[16];
        store16(all, a[g]);
        memcpy(scores + g * ld, all, (size_t)width * sizeof(float));
    }
}

/* scores[g][j] = q[g] . key j for the QB queries q (rows of d) and n keys held in blocks of 16
 * columns: block b = keys 16b..16b+15 as [d][16], so element i of key j is at
 * keys[(j - j % 16) * d + i * 16 + j % 16]. 16 keys' scores are then d multiply-adds of a
 * broadcast query element with one key vector (no horizontal sums), and a block is 16 * d
 * consecutive floats the hardware prefetcher can follow (plain columns, a row per position
 * buffer, ran 2x slower once the layers' keys had left the caches; ad hoc, stop 18). The last
 * block is whole too (rlsc/decode_step.py pads it), its extra scores dropped. scores: QB rows of ld. */
static void scores_of_blocks(const float *q, int64_t d, const float *keys, int64_t n, float *scores, int64_t ld) {
    int64_t j = 0;
    for (; j + 16 < n; j += 32) {  /* two blocks at once: 2 QB independent chains */
        v16 a[QB] = {{0}}, b[QB] = {{0}};
        const float *block = keys + j * d;
        for (int64_t i = 0; i < d; i++) {
            const v16 first = load16(block + i * 16), second = load16(block + (d + i) * 16);
            for (int g = 0; g < QB; g++) {
                a[g] += q[g * d + i] * first;
                b[g] += q[g * d + i] * second;
            }
        }
        store_scores(a, 16, scores + j, ld);
        store_scores(b, n - j - 16 < 16 ? n - j - 16 : 16, scores + j + 16, ld);
    }
    if (j < n) {
        v16 a[QB] = {{0}};
        const float *block = keys + j * d;
        for (int64_t i = 0; i < d; i++) {
            const v16 column = load16(block + i * 16);
            for (int g = 0; g < QB; g++) a[g] += q[g * d + i] * column;
        }
        store_scores(a, n - j, scores + j, ld);
    }
}

/* out[g] += sum_j p[g][j] * value j for the QB weight rows p (row stride ld), values as rows
 * [n, d]: 32 (else 16) elements of every out[g] at a time, one value vector per QB multiply-adds */
static void mix_rows(const float *p, int64_t ld, const float *values, int64_t n, int64_t d, float *out) {
    int64_t c = 0;
    for (; c + 32 <= d; c += 32) {
        v16 a[QB], b[QB];
        for (int g = 0; g < QB; g++) {
            a[g] = load16(out + g * d + c);
            b[g] = load16(out + g * d + c + 16);
        }
        for (int64_t j = 0; j < n; j++) {
            const v16 first = load16(values + j * d + c), second = load16(values + j * d + c + 16);
            for (int g = 0; g < QB; g++) {
                a[g] += p[g * ld + j] * first;
                b[g] += p[g * ld + j] * second;
            }
        }
        for (int g = 0; g < QB; g++) {
            store16(out + g * d + c, a[g]);
            store16(out + g * d + c + 16, b[g]);
        }
    }
    for (; c + 16 <= d; c += 16) {
        v16 a[QB];
        for (int g = 0; g < QB; g++) a[g] = load16(out + g * d + c);
        for (int64_t j = 0; j < n; j++) {
            const v16 value = load16(values + j * d + c);
            for (int g = 0; g < QB; g++) a[g] += p[g * ld + j] * value;
        }
        for (int g = 0; g < QB; g++) store16(out + g * d + c, a[g]);
    }
    for (; c < d; c++)
        for (int g = 0; g < QB; g++) {
            float s = out[g * d + c];
            for (int64_t j = 0; j < n; j++) s += p[g * ld + j] * values[j * d + c];
            out[g * d + c] = s;
        }
}

/* softmax in place over n scores, masked prompt positions (keep[j] == 0) excluded */
static void softmax(float *scores, int64_t n, const uint8_t *prompt_keep, int64_t prompt_len) {
    if (prompt_keep)
        for (int64_t j = 0; j < prompt_len; j++)
            if (!prompt_keep[j]) scores[j] = -3.4e38f;  /* padding: exp(-huge - top) = 0 */
    float top = -3.4e38f;
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < n; j++) top = scores[j] > top ? scores[j] : top;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) scores[j] *= inverse;
}

/* QB query heads (q: QB rows of d; past the row's heads, zeros) of one row: softmax over
 * [prompt keys, own keys 0..own_len-1] of q.k, then the same mix of values into out (QB rows of d).
 * Keys in blocks of 16 columns, values as rows; scores: QB rows of prompt_len + own_len floats. */
static void attend(const float *q, const float *prompt_k, const float *prompt_v, const uint8_t *prompt_keep,
                   int64_t prompt_len, const float *own_k, const float *own_v, int64_t own_len, float *scores,
                   float *out, int64_t d) {
    const int64_t n = prompt_len + own_len;
    scores_of_blocks(q, d, prompt_k, prompt_len, scores, n);
    scores_of_blocks(q, d, own_k, own_len, scores + prompt_len, n);
    for (int g = 0; g < QB; g++) softmax(scores + g * n, n, prompt_keep, prompt_len);
    memset(out, 0, (size_t)(QB * d) * sizeof(float));
    mix_rows(scores, n, prompt_v, prompt_len, d, out);
    mix_rows(scores + prompt_len, n, own_v, own_len, d, out);
}

/* Attention of the new position t of every row, one layer.
 *   q [rows, heads, d], k, v [rows, kv_heads, d]: the projections, q and k not yet rotated, with
 *   row strides ld_q, ld_k, ld_v (slices of one fused q/k/v product have the fused row's);
 *   cos, signed_sin [rows, d]: the row's rotary factors; scale: the scores' scaling (on q);
 *   prompt_k [prompt_rows, kv_heads, prompt_padded / 16, d, 16] (keys in blocks of 16 columns,
 *   scores_of_blocks; prompt_padded = prompt_len padded to a multiple of 16), prompt_v [prompt_rows, kv_heads, prompt_len, d], prompt_rows 1 (shared by all rows)
 *   or rows; prompt_keep [prompt_rows, prompt_len] (1 = attend, 0 = padding) or NULL;
 *   own_k [rows, kv_heads, key_capacity / 16, d, 16] (blocks of 16 columns), own_v
 *   [rows, kv_heads, capacity, d]: the completion's keys and values, position t written here
 *   (k rotated);
 *   out [rows, heads, d]. Head h reads kv head h / (heads / kv_heads), as in transformers.
 * One task per (row, kv head): it writes its key and value, then attends its query heads. */
void rlsc_decode_attention(const float *q, int64_t ld_q, const float *k, int64_t ld_k, const float *v,
                           int64_t ld_v, const float *cos,
                           const float *signed_sin, float scale, const float *prompt_k, const float *prompt_v,
                           const uint8_t *prompt_keep, int64_t prompt_rows, int64_t prompt_len,
                           int64_t prompt_padded, float *own_k,
                           float *own_v, int64_t key_capacity, int64_t capacity, int64_t t, float *out, int64_t rows, int64_t heads,
                           int64_t kv_heads, int64_t d, int threads) {
    const int64_t groups = heads / kv_heads, tasks = rows * kv_heads;
#pragma omp parallel num_threads(threads)
    {
        float scores[QB * (prompt_len + t + 1)], query[QB * d], mixed[QB * d], key[d];
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t r = task / kv_heads, kh = task % kv_heads, pr = prompt_rows == 1 ? 0 : r;
            const float *c = cos + r * d, *s = signed_sin + r * d;
            float *keys = own_k + task * d * key_capacity, *values = own_v + task * capacity * d;
            rotate(k + r * ld_k + kh * d, c, s, 1.0f, key, d);
            for (int64_t i = 0; i < d; i++) keys[(t - t % 16) * d + i * 16 + t % 16] = key[i];
            memcpy(values + t * d, v + r * ld_v + kh * d, (size_t)d * sizeof(float));
            const float *pk = prompt_k + (pr * kv_heads + kh) * d * prompt_padded;
            const float *pv = prompt_v + (pr * kv_heads + kh) * prompt_len * d;
            const uint8_t *keep = prompt_keep ? prompt_keep + pr * prompt_len : NULL;
            for (int64_t g0 = 0; g0 < groups; g0 += QB) {  /* heads kh * groups + g0 .. + QB - 1 */
                const int64_t m = groups - g0 < QB ? groups - g0 : QB, h0 = kh * groups + g0;
                memset(query, 0, sizeof(query));
                for (int64_t g = 0; g < m; g++) rotate(q + r * ld_q + (h0 + g) * d, c, s, scale, query + g * d, d);
                attend(query, pk, pv, keep, prompt_len, keys, values, t + 1, scores, mixed, d);
                memcpy(out + (r * heads + h0) * d, mixed, (size_t)(m * d) * sizeof(float));
            }
        }
    }
}

/* ---- the per-step statistics of the sampling loop (rlsc/sampling.py's StepRecorder) ----
 * From one row's logits z: logp = log_softmax(z / T) (computed as torch computes it: z/T - max -
 * log sum exp), p = exp(logp), the drawn token (inverse CDF: the first v whose float64 cumulative
 * sum of p reaches u * the total; greedy: the first argmax of logp), log p of it, the entropy
 * -sum p logp, max p, the self-certainty -log V - mean logp; then per group of rows (a prompt's
 * samples) the agreement sum_v pbar(v)^2 of their mean distribution. Eager torch made ~10 passes
 * over the [rows, V] table for this (6.6 ms a step at V = 49,152, 21 ms at 151,936; ad hoc,
 * stop 18); here each row is read once and its p written once. */

static void row_statistics(const float *z, int64_t vocab, float temperature, const double *u, float *p,
                           int64_t *chosen, float *logprob, float *entropy, float *max_prob, float *certainty) {
    float top = -3.4e38f;  /* p holds z / T until it holds p */
#pragma omp simd reduction(max : top)
    for (int64_t v = 0; v < vocab; v++) {
        p[v] = z[v] / temperature;
        top = p[v] > top ? p[v] : top;
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t v = 0; v < vocab; v++) total += expf(p[v] - top);
    const float log_total = logf(total);
    double logp_sum = 0.0, plogp_sum = 0.0, p_sum = 0.0;
    float best = -3.4e38f;
#pragma omp simd reduction(+ : logp_sum, plogp_sum, p_sum) reduction(max : best)
    for (int64_t v = 0; v < vocab; v++) {
        const float logp = p[v] - top - log_total;
        p[v] = expf(logp);
        logp_sum += logp;
        plogp_sum += p[v] * logp;
        p_sum += p[v];
        best = logp > best ? logp : best;
    }
    int64_t c = vocab - 1;
    if (u) {  /* inverse CDF: the first v whose float64 cumulative sum reaches u * the total, found
               * block by block (sums of 256 p's, then one block token by token) */
        const double target = *u * p_sum;
        double cdf = 0.0;
        int64_t start = 0;
        for (; start < vocab; start += 256) {
            const int64_t end = start + 256 < vocab ? start + 256 : vocab;
            double block = 0.0;
#pragma omp simd reduction(+ : block)
            for (int64_t v = start; v < end; v++) block += p[v];
            if (cdf + block >= target) break;
            cdf += block;
        }
        for (int64_t v = start; v < vocab; v++) {
            cdf += p[v];
            if (cdf >= target) { c = v; break; }
        }
    } else {  /* greedy: the first argmax of logp, as torch's argmax */
        for (int64_t v = 0; v < vocab; v++)
            if (z[v] / temperature - top - log_total == best) { c = v; break; }
    }
    *chosen = c;
    *logprob = z[c] / temperature - top - log_total;
    *entropy = (float)-plogp_sum;
    *max_prob = expf(best);
    *certainty = (float)(-log((double)vocab) - logp_sum / (double)vocab);
}

/* rows of logits [rows, vocab] -> the statistics above per row (uniforms: one per row, or NULL for
 * greedy), p into probs [rows, vocab]; agreement[g] for the groups[r] of the rows (n_groups; NaN
 * for a group without rows) */
void rlsc_step_statistics(const float *logits, int64_t rows, int64_t vocab, float temperature, const double *uniforms,
                          const int64_t *groups, int64_t n_groups, float *probs, int64_t *chosen, float *logprob,
                          float *entropy, float *max_prob, float *certainty, float *agreement, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        row_statistics(logits + r * vocab, vocab, temperature, uniforms ? uniforms + r : NULL, probs + r * vocab,
                       chosen + r, logprob + r, entropy + r, max_prob + r, certainty + r);
    int64_t members[n_groups];
    double squares[n_groups];
    for (int64_t g = 0; g < n_groups; g++) members[g] = 0, squares[g] = 0.0;
    for (int64_t r = 0; r < rows; r++) members[groups[r]]++;
    enum { SPAN = 2048 };  /* vocabulary entries per piece of work: a group's mean of them stays in L1 */
    const int64_t pieces = (vocab + SPAN - 1) / SPAN;
#pragma omp parallel num_threads(threads)
    {
        float mean[SPAN];
        double mine[n_groups];
        for (int64_t g = 0; g < n_groups; g++) mine[g] = 0.0;
#pragma omp for schedule(static)
        for (int64_t piece = 0; piece < pieces; piece++) {
            const int64_t v0 = piece * SPAN, n = vocab - v0 < SPAN ? vocab - v0 : SPAN;
            for (int64_t g = 0; g < n_groups; g++) {
                if (!members[g]) continue;
                memset(mean, 0, (size_t)n * sizeof(float));
                for (int64_t r = 0; r < rows; r++) {
                    if (groups[r] != g) continue;
                    const float *pr = probs + r * vocab + v0;
#pragma omp simd
                    for (int64_t i = 0; i < n; i++) mean[i] += pr[i];
                }
                const float inverse = 1.0f / (float)members[g];
                double sum = 0.0;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < n; i++) sum += (double)(mean[i] * inverse) * (mean[i] * inverse);
                mine[g] += sum;
            }
        }
#pragma omp critical
        for (int64_t g = 0; g < n_groups; g++) squares[g] += mine[g];
    }
    for (int64_t g = 0; g < n_groups; g++) agreement[g] = members[g] ? (float)squares[g] : __builtin_nanf("");
}
