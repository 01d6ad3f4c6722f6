/* One decode step of a Llama / Qwen2 decoder on the CPU, in fp32: the whole forward pass of one new
 * token per row — embedding, every layer, the LM head — in a single call.
 *
 * Why this exists: a decode step of a ~1 M-parameter model is a few hundred tiny tensor ops, and in
 * PyTorch eager each costs 2-50 µs of dispatch, threading and allocation overhead, several times the
 * arithmetic (bench/RESULTS.md has the profile; torch.compile made it slower). Here a step is one
 * parallel region on our own worker threads (`run_blocks`): the rows are split into blocks, each
 * thread runs every layer for its blocks, and no thread waits for another until the step ends; for
 * weights too large for the caches, all threads share all rows instead ("team mode", below). It
 * computes exactly what `DecodeWeights.step` in model.py computes (that PyTorch version is the
 * reference the tests compare against).
 *
 * Layout conventions (fp32):
 *   a weight W [in K, out N] is stored in column panels of 16: panel p holds columns 16p .. 16p + 15
 *   (the last one may be 8 wide) as a row-major [K, width] block, and panel p starts at 16p·K, so a
 *   matmul reads each panel as one contiguous stream (model.py `panels`);
 *   RMSNorm gains are folded into the matmul after them;
 *   q|k|v is one matmul of width (H + 2·KV)·D; gate|up one matmul of width 2·I;
 *   the cache is [layers, 2 (k, v), B, KV, L, D]; a row's token at position p goes to index p;
 *   rotary: out[c] = y[c]·cos[p][c] + y[c ± D/2]·sin_signed[p][c] within each head.
 * Every column count must be a multiple of 8 (the Python side pads the LM head).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__FMA__) && defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 bc(float s) { return (v8){s, s, s, s, s, s, s, s}; }
/* a·b + c in one rounding where the CPU has FMA. Written out, not left to the compiler's contraction:
 * GCC fused `c += a * b` in the register tile but not in the lone row's narrow-panel loop, so a row's
 * last 8 columns differed in the last bit between running alone and in a batch (or in team mode). */
#if defined(__FMA__) && defined(__x86_64__)
static inline v8 fma8(v8 a, v8 b, v8 c) { return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline v8 fma8(v8 a, v8 b, v8 c) { return a * b + c; }
#endif
static inline float hsum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 vsel(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }

/* e^x for 8 lanes (Cephes' expf: x = n·ln2 + r, a degree-6 polynomial for e^r, 2^n in the exponent
 * bits; ~1 ulp). Inputs are clamped to [-87.3, 88] (results ~1e-38 … 1.6e38), which only matters for
 * softmax tails and silu of large negatives, where the exact value rounds the same way. */
static inline v8 vexp(v8 x) {
    x = vsel(x > bc(88.0f), bc(88.0f), x);
    x = vsel(x < bc(-87.3365447505531f), bc(-87.3365447505531f), x);
    v8 t = x * bc(1.44269504088896341f) + bc(0.5f);
    v8 n = __builtin_convertvector(__builtin_convertvector(t, v8i), v8);
    n -= (v8)((n > t) & (v8i)bc(1.0f));                       /* floor(t): truncation rounds up below 0 */
    x = x - n * bc(0.693359375f) - n * bc(-2.12194440e-4f);
    v8 y = bc(1.9875691500e-4f);
    y = y * x + bc(1.3981999507e-3f);
    y = y * x + bc(8.3334519073e-3f);
    y = y * x + bc(4.1665795894e-2f);
    y = y * x + bc(1.6666665459e-1f);
    y = y * x + bc(5.0000001201e-1f);
    y = y * (x * x) + x + bc(1.0f);
    return y * (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
}

typedef struct {
    int32_t hidden, inter, layers, heads, kv_heads, head_dim, vocab, vocab_padded, max_pos;
    float eps;
    const float *embed;        /* [vocab, hidden], row-major; the matmul weights below are in panels */
    const float *const *qkv;   /* per layer [hidden, (H + 2KV)·D], input norm folded in */
    const float *const *qkv_b; /* per layer [(H + 2KV)·D] (zeros without bias) */
    const float *const *o;     /* per layer [H·D, hidden] */
    const float *const *gu;    /* per layer [hidden, 2·inter], post-attention norm folded in */
    const float *const *down;  /* per layer [inter, hidden] */
    const float *head;         /* [hidden, vocab_padded], final norm folded in */
    const float *cos;          /* [max_pos, D] */
    const float *sin;          /* [max_pos, D], sign of rotate_half folded in */
} Model;

/* One row: y[0:N] (=|+=) x[0:K] @ W — a matrix-vector product, bound by reading W: four panels at a
 * time, 8 accumulators. */
static void matmul_row(int K, int N, const float *x, const float *W, float *y, int accumulate) {
    int j = 0;
    for (; j + 64 <= N; j += 64) {
        v8 c[8];
        for (int i = 0; i < 8; i++) c[i] = accumulate ? ld(y + j + 8 * i) : (v8){0};
        const float *w = W + (size_t)j * K;
        const size_t P = (size_t)16 * K;  /* one panel */
        for (int k = 0; k < K; k++, w += 16) {
            const v8 a = bc(x[k]);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                c[2 * i] = fma8(a, ld(w + i * P), c[2 * i]);
                c[2 * i + 1] = fma8(a, ld(w + i * P + 8), c[2 * i + 1]);
            }
        }
        for (int i = 0; i < 8; i++) st(y + j + 8 * i, c[i]);
    }
    for (; j < N; j += 16) {
        const int width = N - j < 16 ? N - j : 16;
        v8 c0 = accumulate ? ld(y + j) : (v8){0}, c1 = accumulate && width == 16 ? ld(y + j + 8) : (v8){0};
        const float *w = W + (size_t)j * K;
        for (int k = 0; k < K; k++, w += width) {
            c0 = fma8(bc(x[k]), ld(w), c0);
            if (width == 16) c1 = fma8(bc(x[k]), ld(w + 8), c1);
        }
        st(y + j, c0);
        if (width == 16) st(y + j + 8, c1);
    }
}

/* n (≤ 6) rows × columns [j, j + 16) or [j, j + 8): the register tile of `matmul`. Inlined with a
 * constant n, so the loops unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const int n, const int wide, int K, int N, int j,
                                                       const float *x, int ldx, const float *W, float *y, int ldy,
                                                       int accumulate) {
    v8 c[6][2];
    for (int i = 0; i < n; i++) {
        c[i][0] = accumulate ? ld(y + (size_t)i * ldy + j) : (v8){0};
        c[i][1] = accumulate && wide ? ld(y + (size_t)i * ldy + j + 8) : (v8){0};
    }
    const float *w = W + (size_t)j * K;   /* the panel of column j (16 wide, or 8 if it is the last) */
    for (int k = 0; k < K; k++, w += wide ? 16 : 8) {
        const v8 w0 = ld(w), w1 = wide ? ld(w + 8) : (v8){0};
        for (int i = 0; i < n; i++) {
            const v8 a = bc(x[(size_t)i * ldx + k]);
            c[i][0] = fma8(a, w0, c[i][0]);
            if (wide) c[i][1] = fma8(a, w1, c[i][1]);
        }
    }
    for (int i = 0; i < n; i++) {
        st(y + (size_t)i * ldy + j, c[i][0]);
        if (wide) st(y + (size_t)i * ldy + j + 8, c[i][1]);
    }
}

#define TILE_CASES(wide)                                                                       \
    switch (n) {                                                                               \
    case 6: tile(6, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                    \
    case 5: tile(5, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                    \
    case 4: tile(4, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                    \
    case 3: tile(3, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                    \
    case 2: tile(2, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                    \
    default: tile(1, wide, K, N, j, xr, ldx, W, yr, ldy, accumulate); break;                   \
    }

/* y[r, 0:N] = (accumulate ? y : 0) + x[r, 0:K] @ W[0:K, 0:N] for r < R, W in 16-column panels.
 * Register tiles of 6 rows × 16 columns: 12 accumulators, 2 vectors of W and a broadcast fill 15 of
 * the 16 AVX registers, so W is loaded once per k and the FMAs never wait (measured: twice the
 * GFLOP/s of a 4 × 24 tile, which spills). Column tiles outside, row groups inside, so the panel
 * stays in L1 across the row groups; a panel is one contiguous stream, which the hardware prefetcher
 * follows (with W row-major, each k was a 64-byte piece of a row N floats long, and software prefetch
 * was needed). A lone row is a matrix-vector product (`matmul_row`). N must be a multiple of 8. */
static void matmul(int R, int K, int N, const float *x, int ldx, const float *W, float *y, int ldy, int accumulate) {
    if (R == 1) {
        matmul_row(K, N, x, W, y, accumulate);
        return;
    }
    for (int j = 0; j < N; j += 16) {
        for (int r = 0, n; r < R; r += n) {
            /* groups of 6; 10 left go as 5 + 5, not 6 + 4: a 4-row tile has 8 accumulators, so each k
             * waits on the FMA latency and it costs as much as a 6-row one (16 rows a thread: -3 %) */
            n = R - r == 10 ? 5 : R - r < 6 ? R - r : 6;
            const float *xr = x + (size_t)r * ldx;
            float *yr = y + (size_t)r * ldy;
            if (j + 16 <= N) {
                TILE_CASES(1)
            } else {
                TILE_CASES(0)
            }
        }
    }
}

/* The lane sums of 4 vectors in lanes 0..3 (two levels of shuffles instead of four horizontal sums). */
static inline v8 hsum4(v8 a0, v8 a1, v8 a2, v8 a3) {
    const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i plo = {0, 1, 8, 9, 4, 5, 12, 13}, phi = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8 s01 = __builtin_shuffle(a0, a1, lo) + __builtin_shuffle(a0, a1, hi);
    const v8 s23 = __builtin_shuffle(a2, a3, lo) + __builtin_shuffle(a2, a3, hi);
    const v8 t = __builtin_shuffle(s01, s23, plo) + __builtin_shuffle(s01, s23, phi);  /* [lo0..3, hi0..3] */
    return t + __builtin_shuffle(t, (v8i){4, 5, 6, 7, 0, 1, 2, 3});
}

/* sc[t] = scale · q · K[t] for t < S: four keys per iteration, each with its own accumulator. */
static void qk(int S, int D, const float *q, const float *K, float scale, float *sc) {
    int t = 0;
    for (; t + 4 <= S; t += 4) {
        const float *k = K + (size_t)t * D;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int d = 0; d < D; d += 8) {
            const v8 qd = ld(q + d);
            a0 += qd * ld(k + d); a1 += qd * ld(k + D + d); a2 += qd * ld(k + 2 * D + d); a3 += qd * ld(k + 3 * D + d);
        }
        const v8 r = hsum4(a0, a1, a2, a3) * bc(scale);
        sc[t] = r[0]; sc[t + 1] = r[1]; sc[t + 2] = r[2]; sc[t + 3] = r[3];
    }
    for (; t < S; t++) {
        v8 a = {0};
        for (int d = 0; d < D; d += 8) a += ld(q + d) * ld(K + (size_t)t * D + d);
        sc[t] = hsum(a) * scale;
    }
}

/* out[0:D] = inv · Σ_u p[u] · V[u, 0:D]: the value mix of one attention head. Keys run in the inner
 * loop with 2 × 4 independent accumulators per 32 columns, so the FMAs do not wait on each other
 * (one accumulator per column block would make this a chain of S dependent FMAs). */
static void pv(int S, int D, const float *p, const float *V, float inv, float *out) {
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        const float *v = V + d0;
        int u = 0;
        for (; u + 2 <= S; u += 2, v += 2 * D) {
            const v8 w = bc(p[u]), x = bc(p[u + 1]);
            a0 += w * ld(v); a1 += w * ld(v + 8); a2 += w * ld(v + 16); a3 += w * ld(v + 24);
            b0 += x * ld(v + D); b1 += x * ld(v + D + 8); b2 += x * ld(v + D + 16); b3 += x * ld(v + D + 24);
        }
        if (u < S) {
            const v8 w = bc(p[u]);
            a0 += w * ld(v); a1 += w * ld(v + 8); a2 += w * ld(v + 16); a3 += w * ld(v + 24);
        }
        const v8 k = bc(inv);
        st(out + d0, (a0 + b0) * k); st(out + d0 + 8, (a1 + b1) * k);
        st(out + d0 + 16, (a2 + b2) * k); st(out + d0 + 24, (a3 + b3) * k);
    }
    for (; d0 < D; d0 += 8) {
        v8 a = {0}, b = {0};
        int u = 0;
        for (; u + 2 <= S; u += 2) {
            a += bc(p[u]) * ld(V + (size_t)u * D + d0);
            b += bc(p[u + 1]) * ld(V + (size_t)(u + 1) * D + d0);
        }
        if (u < S) a += bc(p[u]) * ld(V + (size_t)u * D + d0);
        st(out + d0, (a + b) * bc(inv));
    }
}

/* Two query heads against the same keys: sc0[t], sc1[t] for t < S, each key row loaded once. */
static inline __attribute__((always_inline)) void qk2(int S, int D, const float *q0, const float *q1, const float *K,
                                                      float scale, float *sc0, float *sc1) {
    int t = 0;
    for (; t + 4 <= S; t += 4) {
        const float *k = K + (size_t)t * D;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int d = 0; d < D; d += 8) {
            const v8 x = ld(q0 + d), y = ld(q1 + d);
            const v8 k0 = ld(k + d), k1 = ld(k + D + d), k2 = ld(k + 2 * D + d), k3 = ld(k + 3 * D + d);
            a0 += x * k0; a1 += x * k1; a2 += x * k2; a3 += x * k3;
            b0 += y * k0; b1 += y * k1; b2 += y * k2; b3 += y * k3;
        }
        const v8 ra = hsum4(a0, a1, a2, a3) * bc(scale), rb = hsum4(b0, b1, b2, b3) * bc(scale);
        sc0[t] = ra[0]; sc0[t + 1] = ra[1]; sc0[t + 2] = ra[2]; sc0[t + 3] = ra[3];
        sc1[t] = rb[0]; sc1[t + 1] = rb[1]; sc1[t + 2] = rb[2]; sc1[t + 3] = rb[3];
    }
    for (; t < S; t++) {
        v8 a = {0}, b = {0};
        for (int d = 0; d < D; d += 8) {
            const v8 k = ld(K + (size_t)t * D + d);
            a += ld(q0 + d) * k;
            b += ld(q1 + d) * k;
        }
        sc0[t] = hsum(a) * scale;
        sc1[t] = hsum(b) * scale;
    }
}

/* sc[t] ← exp(sc[t] − max sc) in place; returns 1 / Σ (the softmax normaliser). */
static float exponentiate(int S, float *sc) {
    v8 vmax = bc(-INFINITY);   /* the maximum in vectors: a scalar loop over S was a fifth of the attention */
    int t = 0;
    for (; t + 8 <= S; t += 8) { const v8 v = ld(sc + t); vmax = vsel(v > vmax, v, vmax); }
    float mx = -INFINITY, sum = 0.0f;
    for (int i = 0; i < 8; i++) mx = vmax[i] > mx ? vmax[i] : mx;
    for (; t < S; t++) mx = sc[t] > mx ? sc[t] : mx;
    v8 vsum = {0};
    for (t = 0; t + 8 <= S; t += 8) { v8 e = vexp(ld(sc + t) - bc(mx)); st(sc + t, e); vsum += e; }
    for (; t < S; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
    return 1.0f / (sum + hsum(vsum));
}

/* Two heads' value mixes over the same values, each value row loaded once (8 accumulators per 32
 * columns, independent of each other). */
static inline __attribute__((always_inline)) void pv2(int S, int D, const float *p0, const float *p1, const float *V,
                                                      float inv0, float inv1, float *out0, float *out1) {
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        const float *v = V + d0;
        for (int u = 0; u < S; u++, v += D) {
            const v8 w = bc(p0[u]), x = bc(p1[u]);
            const v8 v0 = ld(v), v1 = ld(v + 8), v2 = ld(v + 16), v3 = ld(v + 24);
            a0 += w * v0; a1 += w * v1; a2 += w * v2; a3 += w * v3;
            b0 += x * v0; b1 += x * v1; b2 += x * v2; b3 += x * v3;
        }
        const v8 k0 = bc(inv0), k1 = bc(inv1);
        st(out0 + d0, a0 * k0); st(out0 + d0 + 8, a1 * k0); st(out0 + d0 + 16, a2 * k0); st(out0 + d0 + 24, a3 * k0);
        st(out1 + d0, b0 * k1); st(out1 + d0 + 8, b1 * k1); st(out1 + d0 + 16, b2 * k1); st(out1 + d0 + 24, b3 * k1);
    }
    for (; d0 < D; d0 += 8) {
        v8 a = {0}, b = {0};
        for (int u = 0; u < S; u++) {
            const v8 v = ld(V + (size_t)u * D + d0);
            a += bc(p0[u]) * v;
            b += bc(p1[u]) * v;
        }
        st(out0 + d0, a * bc(inv0));
        st(out1 + d0, b * bc(inv1));
    }
}

/* Two query heads of one kv head over its S keys and values: scores, softmax, value mix. Inlined
 * with a constant D for the usual head sizes, so the loops over D unroll and the queries stay in
 * registers (with D known only at run time, the same loops measured 15-25 % slower). */
static inline __attribute__((always_inline)) void attend2(int S, int D, const float *q0, const float *q1,
                                                          const float *K, const float *V, float scale,
                                                          float *s0, float *s1, float *out0, float *out1) {
    qk2(S, D, q0, q1, K, scale, s0, s1);
    const float inv0 = exponentiate(S, s0), inv1 = exponentiate(S, s1);
    pv2(S, D, s0, s1, V, inv0, inv1, out0, out1);
}

/* out[r] = x[r] / rms(x[r]) (the gain is folded into the next matmul). */
static __attribute__((noinline)) void rms_scale(int R, int n, const float *x, float *out, float eps) {
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * n;
        v8 acc = {0};
        for (int i = 0; i < n; i += 8) { v8 v = ld(xr + i); acc += v * v; }
        float inv = 1.0f / sqrtf(hsum(acc) / n + eps);
        for (int i = 0; i < n; i += 8) st(out + (size_t)r * n + i, ld(xr + i) * bc(inv));
    }
}

/* The per-row steps below (and `rms_scale` above) are shared by the block path and team mode, and
 * kept out of line so both run the same machine code: inlined into each, the compiler would be free
 * to fuse a multiply and an add in one copy and not in the other (as it did in the matmul, see
 * `fma8`), and the two modes could differ in the last bit. */

/* Where the [L, D] keys (kv = 0) or values (kv = 1) of layer l, cache row `slot`, kv head j start in
 * the cache [layers, 2, B, KV, L, D]. */
static inline size_t kv_block(const Model *m, int l, int kv, int B, int64_t slot, int j, int L) {
    return ((((size_t)l * 2 + kv) * B + slot) * m->kv_heads + j) * L * m->head_dim;
}

/* Row r's q|k|v after the matmul (yr): bias, rotary on the q and k heads, then the token's keys and
 * values stored at its position p in cache row `slot`. */
static __attribute__((noinline)) void qkv_finish(const Model *m, int l, float *yr, int64_t p, int64_t slot, int B,
                                                  float *cache, int L) {
    const int H = m->heads, KV = m->kv_heads, D = m->head_dim, N = (H + 2 * KV) * D, half = D / 2;
    const float *c = m->cos + (size_t)p * D, *s = m->sin + (size_t)p * D;
    for (int i = 0; i < N; i++) yr[i] += m->qkv_b[l][i];
    for (int h = 0; h < H + KV; h++) {
        float *v = yr + h * D;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * c[i] + b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
    for (int j = 0; j < KV; j++) {
        float *kd = cache + kv_block(m, l, 0, B, slot, j, L) + (size_t)p * D;
        float *vd = cache + kv_block(m, l, 1, B, slot, j, L) + (size_t)p * D;
        memcpy(kd, yr + (H + j) * D, D * sizeof(float));
        memcpy(vd, yr + (H + KV + j) * D, D * sizeof(float));
    }
}

/* The G query heads of kv head j of one row (queries in yr, output to att_r) over cache row `slot`'s
 * positions 0..p: scores, softmax, value mix. `scores` holds G·(p + 1) floats. */
static __attribute__((noinline)) void attend_head(const Model *m, int l, const float *yr, int64_t p, int64_t slot,
                                                   int j, int B, const float *cache, int L, float *scores,
                                                   float *att_r) {
    const int H = m->heads, KV = m->kv_heads, D = m->head_dim, G = H / KV, Sr = (int)p + 1;
    const float scale = 1.0f / sqrtf((float)D);
    const float *K = cache + kv_block(m, l, 0, B, slot, j, L), *V = cache + kv_block(m, l, 1, B, slot, j, L);
    float *out = att_r + (size_t)j * G * D;
    const float *q = yr + (size_t)j * G * D;
    int g = 0;
    for (; g + 2 <= G; g += 2) {  /* two query heads per pass: K and V are read once for both */
        float *s0 = scores + (size_t)g * Sr, *s1 = s0 + Sr;
        const float *q0 = q + (size_t)g * D, *q1 = q0 + D;
        float *o0 = out + (size_t)g * D, *o1 = o0 + D;
        switch (D) {
        case 32: attend2(Sr, 32, q0, q1, K, V, scale, s0, s1, o0, o1); break;
        case 64: attend2(Sr, 64, q0, q1, K, V, scale, s0, s1, o0, o1); break;
        case 128: attend2(Sr, 128, q0, q1, K, V, scale, s0, s1, o0, o1); break;
        default: attend2(Sr, D, q0, q1, K, V, scale, s0, s1, o0, o1); break;
        }
    }
    if (g < G) {
        float *s0 = scores + (size_t)g * Sr;
        qk(Sr, D, q + (size_t)g * D, K, scale, s0);
        pv(Sr, D, s0, V, exponentiate(Sr, s0), out + (size_t)g * D);
    }
}

/* a[0:I] = silu(g) ⊙ u for one row of gate|up (g, then u = g + I). */
static __attribute__((noinline)) void silu_mul(int I, const float *g, float *a) {
    const float *u = g + I;
    for (int i = 0; i < I; i += 8) {
        v8 gi = ld(g + i);
        st(a + i, gi / (bc(1.0f) + vexp(-gi)) * ld(u + i));
    }
}

/* One block of rows through the whole model. Row r reads and writes cache row slots[r]; B is the
 * cache's row capacity. Within a layer the rows are processed in order, so rows that share a slot
 * (the tokens of one prompt, in position order) see each other's keys: that is a prefill. */
static int run_block(const Model *m, int R, const int64_t *tokens, const int64_t *positions, const int64_t *slots,
                     int B, float *cache, int L, float *logits, int last_only) {
    const int hd = m->hidden, I = m->inter, H = m->heads, KV = m->kv_heads, D = m->head_dim;
    const int N = (H + 2 * KV) * D, G = H / KV;
    int S = 1;
    for (int r = 0; r < R; r++) if (positions[r] + 1 > S) S = (int)positions[r] + 1;
    const size_t width = (size_t)(N > 2 * I ? N : 2 * I);
    float *x = calloc((size_t)R * hd, sizeof(float));      /* residual stream */
    float *xn = calloc((size_t)R * (hd > I ? hd : I), sizeof(float));
    float *y = calloc((size_t)R * width, sizeof(float));
    float *att = calloc((size_t)R * H * D, sizeof(float));
    float *scores = malloc((size_t)G * S * sizeof(float));
    if (!x || !xn || !y || !att || !scores) {
        free(x); free(xn); free(y); free(att); free(scores);
        return 1;
    }
    for (int r = 0; r < R; r++) memcpy(x + (size_t)r * hd, m->embed + (size_t)tokens[r] * hd, hd * sizeof(float));

    for (int l = 0; l < m->layers; l++) {
        /* q|k|v = (x / rms) @ Wqkv + b, then rotary on the q and k heads */
        rms_scale(R, hd, x, xn, m->eps);
        matmul(R, hd, N, xn, hd, m->qkv[l], y, N, 0);
        for (int r = 0; r < R; r++) {
            float *yr = y + (size_t)r * N;
            qkv_finish(m, l, yr, positions[r], slots[r], B, cache, L);
            /* attention over this row's own positions 0..p; the G query heads of kv head j share it */
            for (int j = 0; j < KV; j++)
                attend_head(m, l, yr, positions[r], slots[r], j, B, cache, L, scores, att + (size_t)r * H * D);
        }
        matmul(R, H * D, hd, att, H * D, m->o[l], x, hd, 1);           /* x += attn @ Wo */

        /* MLP: x += (silu(gate) * up) @ Wdown, gate|up = (x / rms) @ Wgu */
        rms_scale(R, hd, x, xn, m->eps);
        matmul(R, hd, 2 * I, xn, hd, m->gu[l], y, 2 * I, 0);
        for (int r = 0; r < R; r++) silu_mul(I, y + (size_t)r * 2 * I, xn + (size_t)r * I);
        matmul(R, I, hd, xn, I, m->down[l], x, hd, 1);
    }
    /* a prompt (last_only) needs the logits of its last token only: the next token's distribution */
    const int heads = last_only ? 1 : R;
    rms_scale(heads, hd, x + (size_t)(R - heads) * hd, xn, m->eps);
    /* reuse y when the [heads, vocab_padded] logits fit in it, else allocate just those: with last_only
     * that is one row, not a prompt's worth (2,000 tokens × 152k columns would be 1.2 GB) */
    float *out = y;
    float *extra = NULL;
    if ((size_t)heads * m->vocab_padded > (size_t)R * width)
        out = extra = malloc((size_t)heads * m->vocab_padded * sizeof(float));
    if (!out) {
        free(x); free(xn); free(y); free(att); free(scores);
        return 1;
    }
    matmul(heads, hd, m->vocab_padded, xn, hd, m->head, out, m->vocab_padded, 0);
    memcpy(logits, out, (size_t)heads * m->vocab_padded * sizeof(float));
    free(extra); free(x); free(xn); free(y); free(att); free(scores);
    return 0;
}

/* ---- worker threads ------------------------------------------------------------------------------
 * Why not OpenMP: libgomp lets an idle worker spin for the next region only while it manages no more
 * threads than there are CPUs. The server's scheduler thread calls the step, and torch has its own
 * team in the main thread, so on a 2-core machine every step put the worker to sleep and had to wake
 * it again, and the caller slept at the closing barrier too: two futex round trips per step, each
 * costly on a VM (a halted vCPU must be kicked). Measured: the same 32-row steps 1.35-1.7x slower off
 * the main thread than on it. Here the policy is ours: a worker spins (yielding the CPU to anyone
 * who wants it) for `QIUSUO_SPIN_US` microseconds (default 1000, longer than a scheduler's Python
 * between two steps) before it sleeps on a condition variable. The caller takes blocks too, and once
 * none is left it withdraws the shares no worker has taken yet rather than wait for a sleeping (or
 * preempted) worker to wake up and find nothing to do.
 *
 * One caller at a time owns the workers; a second concurrent caller runs its blocks itself. */

#define MAX_WORKERS 63

typedef struct {
    void (*fn)(void *arg, int block, int *failed);
    void *arg;
    int nblocks;
} Job;

enum { IDLE, OFFERED, TAKEN };               /* a worker's share of the current job */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* held by the caller that owns the workers */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake[MAX_WORKERS];     /* one per worker: a job wakes only its own helpers */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int n_workers;                        /* started so far; they live as long as the process (so the
                                                library must never be unloaded, which ctypes never does) */
static int cannot_start;                     /* pthread_create failed once: make do with n_workers */
static Job job;                              /* written by the owner before it offers shares */
static uint64_t ticket[MAX_WORKERS];         /* bumped by the owner when it offers worker i a share */
static int share[MAX_WORKERS], asleep[MAX_WORKERS];     /* atomics */
static int next_block, pending, job_failed;             /* atomics */
static long spin_ns = 1000000;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* One turn of a spin-wait; every 64th also yields the CPU to any thread waiting for it (a few µs
 * apart) and returns 1, a cue to look at the clock. */
static inline int relax(unsigned i) {
    cpu_relax();
    if (i % 64) return 0;
    sched_yield();
    return 1;
}

static inline long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Take blocks until none is left (the owner and the workers alike: whoever is free takes the next). */
static void take_blocks(void) {
    int b;
    while ((b = __atomic_fetch_add(&next_block, 1, __ATOMIC_RELAXED)) < job.nblocks) job.fn(job.arg, b, &job_failed);
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint64_t seen = 0;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "qiusuo-step");   /* for top -H, py-spy and bench/serve_clients.py */
#endif
    for (;;) {
        uint64_t t;
        const long until = now_ns() + spin_ns;
        for (unsigned i = 1; (t = __atomic_load_n(&ticket[id], __ATOMIC_ACQUIRE)) == seen; i++)
            if (relax(i) && now_ns() > until) break;
        if (t == seen) {
            pthread_mutex_lock(&sleep_lock);
            __atomic_store_n(&asleep[id], 1, __ATOMIC_SEQ_CST);
            while ((t = __atomic_load_n(&ticket[id], __ATOMIC_SEQ_CST)) == seen) pthread_cond_wait(&wake[id], &sleep_lock);
            __atomic_store_n(&asleep[id], 0, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = t;
        /* The owner may have withdrawn the share, having run every block itself: then it is not ours. */
        int offered = OFFERED;
        if (__atomic_compare_exchange_n(&share[id], &offered, TAKEN, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            take_blocks();
            __atomic_sub_fetch(&pending, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void init_wakes(void) {
    for (int i = 0; i < MAX_WORKERS; i++) pthread_cond_init(&wake[i], NULL);
}

/* A forked child has none of the parent's threads: start over (the locks may have been held). */
static void pool_after_fork(void) {
    n_workers = cannot_start = 0;
    memset(ticket, 0, sizeof ticket);
    memset(share, 0, sizeof share);
    memset(asleep, 0, sizeof asleep);
    pending = 0;
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    init_wakes();
}

static void pool_init(void) {
    const char *env = getenv("QIUSUO_SPIN_US");
    if (env && *env) {
        const long us = atol(env);
        spin_ns = us < 0 ? 0 : (us > 10000000L ? 10000000L : us) * 1000L;   /* at most 10 s */
    }
    init_wakes();
    pthread_atfork(NULL, NULL, pool_after_fork);
}

/* fn(arg, b, &failed) for every b < nblocks on up to `threads` threads (the caller is one of them);
 * returns whether any call set `failed`. */
static int run_blocks(void (*fn)(void *, int, int *), void *arg, int nblocks, int threads) {
    int failed = 0;
    int helpers = (threads < nblocks ? threads : nblocks) - 1;
    if (helpers > MAX_WORKERS) helpers = MAX_WORKERS;
    pthread_once(&pool_once, pool_init);
    if (helpers <= 0 || pthread_mutex_trylock(&pool_lock) != 0) {   /* busy: another caller owns the workers */
        for (int b = 0; b < nblocks; b++) fn(arg, b, &failed);
        return failed;
    }
    while (n_workers < helpers && !cannot_start) {   /* started on first need */
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, worker_main, (void *)(intptr_t)n_workers) == 0)
            n_workers++;
        else
            cannot_start = 1;
        pthread_attr_destroy(&attr);
    }
    if (helpers > n_workers) helpers = n_workers;
    job = (Job){fn, arg, nblocks};
    job_failed = 0;
    __atomic_store_n(&next_block, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pending, helpers, __ATOMIC_RELAXED);
    for (int i = 0; i < helpers; i++) {
        __atomic_store_n(&share[i], OFFERED, __ATOMIC_RELEASE);
        __atomic_add_fetch(&ticket[i], 1, __ATOMIC_SEQ_CST);         /* publishes the job */
        if (__atomic_load_n(&asleep[i], __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&sleep_lock);
            pthread_cond_signal(&wake[i]);
            pthread_mutex_unlock(&sleep_lock);
        }
    }
    take_blocks();
    /* Every block is taken. A helper that has not woken up yet would only find nothing left: withdraw
     * its share instead of waiting for it; the helpers that took one are mid-block (short). */
    for (int i = 0; i < helpers; i++) {
        int offered = OFFERED;
        if (__atomic_compare_exchange_n(&share[i], &offered, IDLE, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            __atomic_sub_fetch(&pending, 1, __ATOMIC_RELAXED);
    }
    for (unsigned i = 1; __atomic_load_n(&pending, __ATOMIC_ACQUIRE); i++) relax(i);
    failed = __atomic_load_n(&job_failed, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pool_lock);
    return failed;
}

typedef struct {
    const Model *m;
    const int64_t *tokens, *positions, *slots;
    const int32_t *block_start;
    float *cache, *logits;
    int B, capacity, L, per, nblocks, last_only;
} StepArgs;

static void step_block(void *arg, int blk, int *failed) {
    const StepArgs *a = arg;
    const int b0 = a->nblocks > 0 ? a->block_start[blk] : blk * a->per;
    const int b1 = a->nblocks > 0 ? a->block_start[blk + 1] : (b0 + a->per <= a->B ? b0 + a->per : a->B);
    if (b1 > b0 && run_block(a->m, b1 - b0, a->tokens + b0, a->positions + b0, a->slots + b0, a->capacity, a->cache,
                             a->L, a->logits + (size_t)(a->last_only ? blk : b0) * a->m->vocab_padded, a->last_only))
        __atomic_store_n(failed, 1, __ATOMIC_RELAXED);
}

/* ---- team mode ------------------------------------------------------------------------------------
 * Blocks of rows share nothing, but each block reads every weight: with 2 blocks the weights stream
 * through the memory system twice per step. That is free while they fit in the caches (the 0.8 M demo
 * model's 3 MB), and doubles the DRAM traffic of a model that does not (a 24 M model is 97 MB, a 0.5 B
 * one 2 GB); a block also runs on one thread, so a lone row or a single prompt's prefill leaves the
 * other cores idle. In team mode every thread works on all the rows, one phase at a time: a matmul's
 * column panels, or the rows (for attention, the (row, kv head) pairs) of the steps between, are dealt
 * out in small chunks that whoever is free takes (an atomic counter per phase), and a phase starts
 * when the previous one's chunks are all done. A thread that is late, or never wakes, finds the chunks
 * taken and only the threads holding one are waited for, as with blocks. The arithmetic of every
 * output is the one the block path does (same tiles, same order within each row), so the two modes
 * give bit-identical logits and caches. */

typedef struct {
    const Model *m;
    const int64_t *positions, *slots;
    float *cache, *logits;
    int B, capacity, L, S, members;
    float *x, *xn, *y, *att, *scores;      /* shared activations; scores: G·S floats per member */
    int *next, *done;                      /* per phase: chunks handed out, chunks finished */
    const int32_t *ends;                   /* last_only: the P prompts' bounds (their last rows get logits) */
    int P;
} Team;

static inline int team_take(Team *t, int ph, int n) {
    const int c = __atomic_fetch_add(&t->next[ph], 1, __ATOMIC_RELAXED);
    return c < n ? c : -1;
}

static inline void team_done(Team *t, int ph) { __atomic_add_fetch(&t->done[ph], 1, __ATOMIC_RELEASE); }

static inline void team_wait(Team *t, int ph, int n) {
    for (unsigned i = 1; __atomic_load_n(&t->done[ph], __ATOMIC_ACQUIRE) < n; i++) relax(i);
}

/* chunk c of n over `total` items: [*lo, *hi) */
static inline void chunk_range(int c, int n, int total, int *lo, int *hi) {
    const int per = (total + n - 1) / n;
    *lo = c * per;
    *hi = *lo + per < total ? *lo + per : total;
}

static inline int n_chunks(int total, int members) {
    const int n = 4 * members;   /* a few chunks a thread, so a late thread still finds work */
    return total < n ? total : n;
}

/* y[:, cols] (=|+=) x @ W for one phase: chunks of whole panels (a multiple of 4 panels for a lone
 * row, `matmul_row`'s group), so every column is computed as the block path computes it. */
static void team_matmul(Team *t, int ph, int R, int K, int N, const float *x, int ldx, const float *W, float *y,
                         int ldy, int accumulate) {
    const int panels = (N + 15) / 16, group = R == 1 ? 4 : 1;
    const int units = (panels + group - 1) / group, n = n_chunks(units, t->members);
    for (int c; (c = team_take(t, ph, n)) >= 0; team_done(t, ph)) {
        int u0, u1;
        chunk_range(c, n, units, &u0, &u1);
        const int j0 = 16 * group * u0, j1 = 16 * group * u1 < N ? 16 * group * u1 : N;
        if (j1 > j0) matmul(R, K, j1 - j0, x, ldx, W + (size_t)j0 * K, y + j0, ldy, accumulate);
    }
    team_wait(t, ph, n);
}

/* xn = x / rms(x), row by row, for one phase; with `ends` (the final norm of a prefill), xn[k] from the
 * last row of prompt k only. */
static void team_rms(Team *t, int ph, const int32_t *ends) {
    const int hd = t->m->hidden, R = ends ? t->P : t->B, n = n_chunks(R, t->members);
    for (int c, lo, hi; (c = team_take(t, ph, n)) >= 0; team_done(t, ph)) {
        chunk_range(c, n, R, &lo, &hi);
        if (ends) {
            for (int k = lo; k < hi; k++)
                rms_scale(1, hd, t->x + (size_t)(ends[k + 1] - 1) * hd, t->xn + (size_t)k * hd, t->m->eps);
        } else {
            rms_scale(hi - lo, hd, t->x + (size_t)lo * hd, t->xn + (size_t)lo * hd, t->m->eps);
        }
    }
    team_wait(t, ph, n);
}

static void team_member(void *arg, int me, int *failed) {
    Team *t = arg;
    const Model *m = t->m;
    const int R = t->B, hd = m->hidden, I = m->inter, H = m->heads, KV = m->kv_heads, D = m->head_dim;
    const int N = (H + 2 * KV) * D, G = H / KV, nr = n_chunks(R, t->members), nu = n_chunks(R * KV, t->members);
    float *scores = t->scores + (size_t)me * G * t->S;
    int ph = 0, lo, hi;
    (void)failed;
    for (int l = 0; l < m->layers; l++) {
        team_rms(t, ph++, NULL);
        team_matmul(t, ph++, R, hd, N, t->xn, hd, m->qkv[l], t->y, N, 0);
        /* every row's keys and values are in the cache before any row attends: a prompt's later
         * tokens read its earlier ones (prefill) */
        for (int c; (c = team_take(t, ph, nr)) >= 0; team_done(t, ph)) {
            chunk_range(c, nr, R, &lo, &hi);
            for (int r = lo; r < hi; r++)
                qkv_finish(m, l, t->y + (size_t)r * N, t->positions[r], t->slots[r], t->capacity, t->cache, t->L);
        }
        team_wait(t, ph++, nr);
        for (int c; (c = team_take(t, ph, nu)) >= 0; team_done(t, ph)) {
            chunk_range(c, nu, R * KV, &lo, &hi);
            for (int u = lo; u < hi; u++) {
                const int r = u / KV;
                attend_head(m, l, t->y + (size_t)r * N, t->positions[r], t->slots[r], u % KV, t->capacity, t->cache,
                            t->L, scores, t->att + (size_t)r * H * D);
            }
        }
        team_wait(t, ph++, nu);
        team_matmul(t, ph++, R, H * D, hd, t->att, H * D, m->o[l], t->x, hd, 1);
        team_rms(t, ph++, NULL);
        team_matmul(t, ph++, R, hd, 2 * I, t->xn, hd, m->gu[l], t->y, 2 * I, 0);
        for (int c; (c = team_take(t, ph, nr)) >= 0; team_done(t, ph)) {
            chunk_range(c, nr, R, &lo, &hi);
            for (int r = lo; r < hi; r++) silu_mul(I, t->y + (size_t)r * 2 * I, t->xn + (size_t)r * I);
        }
        team_wait(t, ph++, nr);
        team_matmul(t, ph++, R, I, hd, t->xn, I, m->down[l], t->x, hd, 1);
    }
    team_rms(t, ph++, t->ends);
    team_matmul(t, ph++, t->ends ? t->P : R, hd, m->vocab_padded, t->xn, hd, m->head, t->logits, m->vocab_padded, 0);
}

#define TEAM_PHASES(layers) (9 * (layers) + 2)

/* All B rows on `threads` threads in team mode (see above); returns nonzero when out of memory. */
static int run_team(const Model *m, int B, const int64_t *tokens, const int64_t *positions, const int64_t *slots,
                    float *cache, int capacity, int L, float *logits, int threads, const int32_t *ends, int P) {
    const int hd = m->hidden, I = m->inter, H = m->heads, KV = m->kv_heads, D = m->head_dim;
    const int N = (H + 2 * KV) * D, G = H / KV, members = threads < 1 ? 1 : threads;
    int S = 1;
    for (int r = 0; r < B; r++) if (positions[r] + 1 > S) S = (int)positions[r] + 1;
    const size_t width = (size_t)(N > 2 * I ? N : 2 * I);
    Team t = {m, positions, slots, cache, logits, B, capacity, L, S, members,
              calloc((size_t)B * hd, sizeof(float)), calloc((size_t)B * (hd > I ? hd : I), sizeof(float)),
              calloc((size_t)B * width, sizeof(float)), calloc((size_t)B * H * D, sizeof(float)),
              malloc((size_t)members * G * S * sizeof(float)),
              calloc(TEAM_PHASES(m->layers), sizeof(int)), calloc(TEAM_PHASES(m->layers), sizeof(int)), ends, P};
    int failed = !t.x || !t.xn || !t.y || !t.att || !t.scores || !t.next || !t.done;
    if (!failed) {
        for (int r = 0; r < B; r++) memcpy(t.x + (size_t)r * hd, m->embed + (size_t)tokens[r] * hd, hd * sizeof(float));
        failed = run_blocks(team_member, &t, members, threads);
    }
    free(t.x); free(t.xn); free(t.y); free(t.att); free(t.scores); free(t.next); free(t.done);
    return failed;
}

/* One new token for each of B rows: tokens/positions/slots [B] → logits [B, vocab_padded]; writes the
 * new keys and values into cache [layers, 2, capacity, KV, L, D] at (slots[b], positions[b]).
 *
 * Decode: slots = NULL (row b is cache row b), nblocks = 0: rows are independent, so they are split
 * into blocks that run on `threads` threads with no synchronisation inside the step.
 * Prefill: the tokens of each prompt in position order, sharing the prompt's slot, one block per
 * prompt (block k is rows block_start[k] .. block_start[k + 1] − 1): prompts run in parallel. With
 * last_only, logits [nblocks, vocab_padded] holds each block's last row only: a prompt's other
 * positions need no logits, and with a large vocabulary the LM head over every prompt token is a
 * large share of the work (a quarter of a 0.5 B Qwen's weights) and of the memory.
 * team != 0: all rows in team mode instead (see above; blocks only mark the last rows), same results. */
int qiusuo_decode_step(const Model *m, int B, const int64_t *tokens, const int64_t *positions, const int64_t *slots,
                       float *cache, int capacity, int L, float *logits, const int32_t *block_start, int nblocks,
                       int threads, int team, int last_only) {
    if (m->head_dim % 8 || m->hidden % 8 || m->inter % 8 || m->vocab_padded % 8 || m->heads % m->kv_heads) return 1;
    if (!slots && B > capacity) return 1;
    for (int b = 0; b < B; b++) {
        if (positions[b] < 0 || positions[b] >= L || positions[b] >= m->max_pos) return 2;
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return 3;
        if (slots && (slots[b] < 0 || slots[b] >= capacity)) return 4;
    }
    if (B <= 0) return B < 0 || nblocks > 0 ? 6 : 0;   /* no rows: nothing to do, and no block can be nonempty */
    if (last_only && nblocks < 1) return 1;
    for (int k = 0; k < nblocks; k++)   /* blocks: nonempty, in order, covering the rows */
        if (block_start[k] < 0 || block_start[k + 1] <= block_start[k] || block_start[k + 1] > B) return 6;
    if (threads < 1) threads = 1;
    int64_t *identity = NULL;
    if (!slots) {
        identity = malloc((size_t)B * sizeof(int64_t));
        if (!identity) return 5;
        for (int b = 0; b < B; b++) identity[b] = b;
        slots = identity;
    }
    if (team) {
        const int failed = run_team(m, B, tokens, positions, slots, cache, capacity, L, logits, threads,
                                    last_only ? block_start : NULL, nblocks);
        free(identity);
        return failed ? 5 : 0;
    }
    /* automatic blocks: one per thread (balanced), at most 36 rows so a block's activations stay in cache */
    int per = (B + threads - 1) / threads;
    if (per > 36) per = 36;
    const int blocks = nblocks > 0 ? nblocks : (B + per - 1) / per;
    StepArgs args = {m, tokens, positions, slots, block_start, cache, logits, B, capacity, L, per, nblocks,
                     last_only != 0};
    const int failed = run_blocks(step_block, &args, blocks, threads);
    free(identity);
    return failed ? 5 : 0;
}

/* ---- sampling ------------------------------------------------------------------------------------
 * What `engine.sample_next` does, per row, in one call: the row's uniform u is splitmix64 of (key,
 * counter) exactly as `engine.uniform` computes it; temperature 0 is argmax; a row with no top-p /
 * top-k cut draws by inverse CDF in vocabulary order, a row with a cut in descending-probability
 * order (ties by index) after dropping what top-k and top-p exclude. */

static double splitmix_uniform(uint64_t key, uint64_t counter) {
    uint64_t z = key + counter * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return (double)(z >> 11) / 9007199254740992.0;
}

/* Sort keys ascending: quicksort (median of three) down to runs of 16, then one insertion pass. Inline
 * comparisons on plain integers; qsort's comparator call per comparison was most of a top-p draw. */
static void sort_keys(uint64_t *a, int n) {
    while (n > 16) {
        uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
        const uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int i = 0, j = n - 1;
        for (;;) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i >= j) break;
            const uint64_t t = a[i]; a[i] = a[j]; a[j] = t;
            i++; j--;
        }
        /* recurse into the smaller side, loop on the larger: the stack stays logarithmic */
        if (j + 1 < n - j - 1) { sort_keys(a, j + 1); a += j + 1; n -= j + 1; }
        else { sort_keys(a + j + 1, n - j - 1); n = j + 1; }
    }
    for (int i = 1; i < n; i++) {
        const uint64_t v = a[i];
        int j = i - 1;
        for (; j >= 0 && a[j] > v; j--) a[j + 1] = a[j];
        a[j + 1] = v;
    }
}

/* Descending probability, ties by ascending index, as one integer: a non-negative float's bits order
 * as the float does, so the complement of the bits goes high and the index low. */
static inline uint64_t rank_key(const float *probs, int i) {
    uint32_t bits;
    memcpy(&bits, probs + i, sizeof bits);
    return ((uint64_t)(0xFFFFFFFFu - bits) << 32) | (uint32_t)i;
}

/* The first `keep` tokens in rank order are walked until their mass reaches top_p of `kept_total`;
 * returns how many are kept (the first token always is), or −1 when the walk ran past the n sorted
 * keys before deciding (the caller then sorts more of the vocabulary). */
static int top_p_prefix(const uint64_t *keys, int n, int keep, const float *probs, double kept_total, float top_p,
                        double *mass) {
    double cum = 0.0;
    int k = 0;
    for (; k < keep; k++) {
        if (k > 0 && cum / kept_total >= top_p) break;
        if (k == n) return -1;
        cum += probs[(uint32_t)keys[k]];
    }
    *mass = cum;
    return k;
}

static int sample_row(const float *logits, int V, float temperature, float top_p, int64_t top_k, double u,
                      float *probs, uint64_t *keys) {
    int best = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    if (temperature == 0.0f) return best;
    const float mx = logits[best] / temperature;
    int i = 0;
    for (; i + 8 <= V; i += 8) st(probs + i, vexp(ld(logits + i) / bc(temperature) - bc(mx)));
    for (; i < V; i++) probs[i] = expf(logits[i] / temperature - mx);
    double total = 0.0;
    for (i = 0; i < V; i++) total += probs[i];
    const int cut = top_p < 1.0f || top_k > 0;
    if (!cut) {
        const double target = u * total;
        double cum = 0.0;
        for (i = 0; i < V; i++) { cum += probs[i]; if (cum > target) return i; }
        return V - 1;
    }
    const int keep = (top_k > 0 && top_k < V) ? (int)top_k : V;
    int n = 0, kept = -1;
    double mass = 0.0;
    if (keep == V) {
        /* Without top-k only the tokens top-p keeps need ordering: those at or above a threshold,
         * lowered until their mass reaches top_p, are a prefix of the rank order (ties at the
         * threshold included); a trained model's prefix is a few tokens of a large vocabulary. */
        for (float t = 0.25f; kept < 0 && t > 1e-30f; t *= 0.0625f) {
            double above = 0.0;
            for (i = 0; i < V; i++) above += probs[i] >= t ? probs[i] : 0.0f;
            if (above < (double)top_p * total) continue;
            n = 0;
            for (i = 0; i < V; i++) if (probs[i] >= t) keys[n++] = rank_key(probs, i);
            sort_keys(keys, n);
            kept = top_p_prefix(keys, n, keep, probs, total, top_p, &mass);
        }
    }
    if (kept < 0) {   /* top-k, or no threshold sufficed: the whole vocabulary in rank order */
        for (i = 0; i < V; i++) keys[i] = rank_key(probs, i);
        sort_keys(keys, V);
        double kept_total = 0.0;
        for (i = 0; i < keep; i++) kept_total += probs[(uint32_t)keys[i]];
        kept = top_p_prefix(keys, V, keep, probs, keep == V ? total : kept_total, top_p, &mass);
    }
    const double target = u * mass;
    double run = 0.0;
    for (i = 0; i < kept; i++) { run += probs[(uint32_t)keys[i]]; if (run > target) return (int)(uint32_t)keys[i]; }
    return (int)(uint32_t)keys[kept - 1];
}

/* tokens[b] for b < B from logits [B, ld] (first V columns); counters[b] is the row's draw index. */
int qiusuo_sample(int B, int V, const float *logits, int ld, const float *temperature, const float *top_p,
                  const int64_t *top_k, const int64_t *keys, const int64_t *counters, int64_t *tokens) {
    float *probs = malloc((size_t)V * sizeof(float));
    uint64_t *order = malloc((size_t)V * sizeof(uint64_t));
    if (!probs || !order) { free(probs); free(order); return 1; }
    for (int b = 0; b < B; b++) {
        const double u = splitmix_uniform((uint64_t)keys[b], (uint64_t)counters[b]);
        tokens[b] = sample_row(logits + (size_t)b * ld, V, temperature[b], top_p[b], top_k[b], u, probs, order);
    }
    free(probs); free(order);
    return 0;
}

/* Copy the first `upto` positions of cache rows src[i] to rows dst[i] (disjoint sets), in every layer,
 * for keys and values: how a prefilled prompt fans out to its samples and how a finished row's place
 * is taken by a running one. */
void qiusuo_copy_rows(float *cache, int layers, int capacity, int kv_heads, int L, int D, const int64_t *src,
                      const int64_t *dst, int n, int upto) {
    const size_t span = (size_t)L * D, bytes = (size_t)upto * D * sizeof(float);
    for (int l = 0; l < layers; l++)
        for (int c = 0; c < 2; c++)
            for (int i = 0; i < n; i++)
                for (int j = 0; j < kv_heads; j++)
                    memcpy(cache + ((((size_t)l * 2 + c) * capacity + dst[i]) * kv_heads + j) * span,
                           cache + ((((size_t)l * 2 + c) * capacity + src[i]) * kv_heads + j) * span, bytes);
}
