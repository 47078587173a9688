/* y = x W^T for a few rows of x, reading each weight once: mtplab's "stream" kernel (see mtplab/kernels.py), and
 * below it the fused decoder layer built on it (mtplab/fastpath.py).
 *
 * W is the nn.Linear weight as PyTorch stores it: [out, in], row-major. For a block of A weight rows and RN rows of
 * x, A * RN <= 16 vector accumulators run along `in`; the A weight rows are loaded from memory once and stay in L1
 * while the other rows of x use them. A (1, 2 or 4) is set per row count by measurement on each machine
 * (mtplab_set_block_width). Weight rows a few rows ahead are prefetched, so the memory system is busy while the
 * block computes. Plain C with GCC/Clang vector extensions, VL float lanes wide: the machine's own vector width
 * (16 with AVX-512, 8 with AVX/AVX2, 4 otherwise: SSE, NEON), chosen by the compiler's target (-march=native). A
 * vector wider than the machine's is not split into registers by GCC 12 but kept in memory and moved through
 * general registers: with 16 lanes on an AVX2-only AMD EPYC a pass over 2 tokens cost 1.6x a 1-token one.
 * Results differ from MKL's only by the order of float additions (about 1e-6 relative); that order follows VL, so
 * two machines may differ in the last bits, while on one machine every row count gives the same numbers. Parallel
 * over output blocks with OpenMP (PyTorch's own runtime when the process already loaded it: the same soname,
 * libgomp.so.1).
 */
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int vfi __attribute__((vector_size(VL * 4)));

/* The float lanes of this build's vectors (mtplab.kernels reports it). */
long mtplab_vector_lanes(void) { return VL; }

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }

/* a * b + c. mtplab compiles this file with -ffp-contract=off, so the compiler never fuses a product and a sum on
 * its own: GCC did so in some blocks and not in others, and a row's result then depended on the block width. Where
 * the machine has FMA, these fuse explicitly, everywhere alike. */
#if defined(__FMA__) && VL >= 8
#include <immintrin.h>
#if VL == 16
static inline vf madd(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
static inline vf madd(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#endif
static inline float madd1(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
static inline vf madd(vf a, vf b, vf c) { return a * b + c; }
static inline float madd1(float a, float b, float c) { return a * b + c; }
#endif

/* Lane i of the result is the sum of all lanes of v[i], for VL accumulators v: one tree of shuffles and adds that
 * treats every accumulator alike (lanes l and l + VL/2 first, then l and l + VL/4, ...). */
static inline vf reduce_group(const vf *v) {
#if VL == 16
    vf c[8], e[4], g[2];
    for (int i = 0; i < 8; i++)
        c[i] = __builtin_shufflevector(v[2*i], v[2*i+1], 0,1,2,3,4,5,6,7, 16,17,18,19,20,21,22,23)
             + __builtin_shufflevector(v[2*i], v[2*i+1], 8,9,10,11,12,13,14,15, 24,25,26,27,28,29,30,31);
    for (int i = 0; i < 4; i++)
        e[i] = __builtin_shufflevector(c[2*i], c[2*i+1], 0,1,2,3, 8,9,10,11, 16,17,18,19, 24,25,26,27)
             + __builtin_shufflevector(c[2*i], c[2*i+1], 4,5,6,7, 12,13,14,15, 20,21,22,23, 28,29,30,31);
    for (int i = 0; i < 2; i++)
        g[i] = __builtin_shufflevector(e[2*i], e[2*i+1], 0,1, 4,5, 8,9, 12,13, 16,17, 20,21, 24,25, 28,29)
             + __builtin_shufflevector(e[2*i], e[2*i+1], 2,3, 6,7, 10,11, 14,15, 18,19, 22,23, 26,27, 30,31);
    return __builtin_shufflevector(g[0], g[1], 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30)
         + __builtin_shufflevector(g[0], g[1], 1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31);
#elif VL == 8
    vf c[4], e[2];
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shufflevector(v[2*i], v[2*i+1], 0,1,2,3, 8,9,10,11)
             + __builtin_shufflevector(v[2*i], v[2*i+1], 4,5,6,7, 12,13,14,15);
    for (int i = 0; i < 2; i++)
        e[i] = __builtin_shufflevector(c[2*i], c[2*i+1], 0,1, 4,5, 8,9, 12,13)
             + __builtin_shufflevector(c[2*i], c[2*i+1], 2,3, 6,7, 10,11, 14,15);
    return __builtin_shufflevector(e[0], e[1], 0,2,4,6,8,10,12,14) + __builtin_shufflevector(e[0], e[1], 1,3,5,7,9,11,13,15);
#else
    vf c[2];
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shufflevector(v[2*i], v[2*i+1], 0,1, 4,5) + __builtin_shufflevector(v[2*i], v[2*i+1], 2,3, 6,7);
    return __builtin_shufflevector(c[0], c[1], 0,2,4,6) + __builtin_shufflevector(c[0], c[1], 1,3,5,7);
#endif
}

#define PREFETCH_ROWS 4

/* y[r0 .. r0+RN-1][j0 .. j0+A-1]: A weight rows times RN rows of x, A * RN <= 16 vector accumulators. Every output
 * is summed in the same order (VL lanes along `in`, the same lane reduction, the same tail) whatever A and RN are:
 * a row's result does not depend on how many rows are computed with it. WT is the weight's element type, LOADW
 * turns VL of them into VL floats (float32 weights, or half-precision ones below: the arithmetic is float32). */
#define BLOCK_T(A, RN, WT, LOADW, SUF)                                                                    \
static void block##SUF##_##A##_##RN(const float *x, const WT *w, float *y, long in, long out, long j0, long r0) { \
    vf acc[((A) * (RN) + VL - 1) / VL * VL];  /* whole groups of VL for the reduction; the spare ones stay 0 */ \
    float sums[sizeof acc / sizeof acc[0]];                                                                \
    memset(acc, 0, sizeof acc);                                                                            \
    const WT *w0 = w + j0 * in;                                                                            \
    long k = 0;                                                                                            \
    for (; k + VL <= in; k += VL) {                                                                        \
        vf wv[A], xv[RN];                                                                                  \
        for (int a = 0; a < A; a++) {                                                                      \
            wv[a] = LOADW(w0 + a * in + k);                                                                \
            if (((k * (long)sizeof(WT)) & 63) == 0) /* once per 64-byte line */                           \
                __builtin_prefetch(w0 + (a + PREFETCH_ROWS) * in + k);                                     \
        }                                                                                                  \
        for (int r = 0; r < RN; r++) xv[r] = load(x + (r0 + r) * in + k);                                  \
        for (int a = 0; a < A; a++)                                                                        \
            for (int r = 0; r < RN; r++) acc[a * RN + r] = madd(wv[a], xv[r], acc[a * RN + r]);            \
    }                                                                                                      \
    for (int g = 0; g < (A) * (RN); g += VL) {                                                             \
        vf t = reduce_group(acc + g);                                                                      \
        memcpy(sums + g, &t, sizeof t);                                                                    \
    }                                                                                                      \
    for (int a = 0; a < A; a++)                                                                            \
        for (int r = 0; r < RN; r++) {                                                                     \
            float s = sums[a * RN + r];                                                                    \
            for (long kk = k; kk < in; kk++) s = madd1((float)w0[a * in + kk], x[(r0 + r) * in + kk], s);  \
            y[(r0 + r) * out + j0 + a] = s;                                                                \
        }                                                                                                  \
}
#define BLOCK(A, RN) BLOCK_T(A, RN, float, load, )
BLOCK(4, 1) BLOCK(4, 2) BLOCK(4, 3) BLOCK(4, 4)
BLOCK(2, 1) BLOCK(2, 2) BLOCK(2, 3) BLOCK(2, 4) BLOCK(2, 5) BLOCK(2, 6) BLOCK(2, 7) BLOCK(2, 8)
BLOCK(1, 1) BLOCK(1, 2) BLOCK(1, 3) BLOCK(1, 4) BLOCK(1, 5) BLOCK(1, 6) BLOCK(1, 7) BLOCK(1, 8)
BLOCK(1, 9) BLOCK(1, 10) BLOCK(1, 11) BLOCK(1, 12) BLOCK(1, 13) BLOCK(1, 14) BLOCK(1, 15) BLOCK(1, 16)

typedef void (*block_fn)(const float *, const float *, float *, long, long, long, long);
/* BLOCKS[w][rn]: w = 0, 1, 2 for blocks of 1, 2, 4 weight rows (A * RN <= 16 accumulators) */
static const block_fn BLOCKS[3][17] = {
    {0, block_1_1, block_1_2, block_1_3, block_1_4, block_1_5, block_1_6, block_1_7, block_1_8, block_1_9,
     block_1_10, block_1_11, block_1_12, block_1_13, block_1_14, block_1_15, block_1_16},
    {0, block_2_1, block_2_2, block_2_3, block_2_4, block_2_5, block_2_6, block_2_7, block_2_8},
    {0, block_4_1, block_4_2, block_4_3, block_4_4}};
static const block_fn *ONE_ROW_BLOCKS = BLOCKS[0];

/* Weight rows per block for each row count of x. Which is fastest differs between CPUs (4 for 1-4 rows was best on
 * one Xeon; 1 streams faster on an AMD EPYC): mtplab.kernels measures them on each machine and sets them here. The
 * width never changes a result: every output is summed in the same order (see BLOCK_T). */
static int WIDTH[17] = {0, 4, 4, 4, 4, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1};

/* Set the block width for `rn` rows of x (1, 2 or 4 weight rows, width * rn <= 16); -1 if not allowed, else 0. */
int mtplab_set_block_width(long rn, long width) {
    if (rn < 1 || rn > 16 || !(width == 1 || width == 2 || width == 4) || width * rn > 16) return -1;
    WIDTH[rn] = (int)width;
    return 0;
}

long mtplab_block_width(long rn) { return rn < 1 || rn > 16 ? -1 : WIDTH[rn]; }

/* x: [n, in], w: [out, in], y: [n, out], all contiguous float32. Up to 16 rows of x go through each block of weight
 * rows together, so each weight is read from memory once; more rows are taken 16 at a time. */
void mtplab_few_rows_linear(const float *x, const float *w, float *y, long n, long in, long out, int threads) {
    for (long r0 = 0; r0 < n; r0 += 16) {
        long rn = n - r0 < 16 ? n - r0 : 16, a = WIDTH[rn], full = out / a * a;
        block_fn block = BLOCKS[a == 4 ? 2 : a - 1][rn];
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long j0 = 0; j0 < full; j0 += a) block(x, w, y, in, out, j0, r0);
        for (long j = full; j < out; j++) ONE_ROW_BLOCKS[rn](x, w, y, in, out, j, r0);
    }
}

/* The same product with float16 weights (IEEE half, as PyTorch's torch.float16), float32 x, y and arithmetic: half
 * the bytes to read, for a drafter whose weights ship in float16 (mtplab.drafters.mtp). Up to 4 rows of x. Only
 * where the compiler knows _Float16 (GCC 12+, Clang); mtplab.kernels asks whether the symbol exists. */
#ifdef __FLT16_MAX__
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
typedef _Float16 hv __attribute__((vector_size(VL * 2)));
static inline vf load_h(const _Float16 *p) {  /* GCC 12 turns __builtin_convertvector here into scalar converts */
#if VL == 16
    __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    vf v; memcpy(&v, &f, sizeof v); return v;
#elif VL == 8 && defined(__F16C__)
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    vf v; memcpy(&v, &f, sizeof v); return v;
#else
    hv v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, vf);
#endif
}
BLOCK_T(4, 1, _Float16, load_h, _h) BLOCK_T(4, 2, _Float16, load_h, _h) BLOCK_T(4, 3, _Float16, load_h, _h)
BLOCK_T(4, 4, _Float16, load_h, _h) BLOCK_T(1, 1, _Float16, load_h, _h) BLOCK_T(1, 2, _Float16, load_h, _h)
BLOCK_T(1, 3, _Float16, load_h, _h) BLOCK_T(1, 4, _Float16, load_h, _h)

typedef void (*block_h_fn)(const float *, const _Float16 *, float *, long, long, long, long);
static const block_h_fn BLOCKS_H[5] = {0, block_h_4_1, block_h_4_2, block_h_4_3, block_h_4_4};
static const block_h_fn ONE_ROW_BLOCKS_H[5] = {0, block_h_1_1, block_h_1_2, block_h_1_3, block_h_1_4};

void mtplab_few_rows_linear_f16(const float *x, const _Float16 *w, float *y, long n, long in, long out, int threads) {
    for (long r0 = 0; r0 < n; r0 += 4) {
        long rn = n - r0 < 4 ? n - r0 : 4, full = out / 4 * 4;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (long j0 = 0; j0 < full; j0 += 4) BLOCKS_H[rn](x, w, y, in, out, j0, r0);
        for (long j = full; j < out; j++) ONE_ROW_BLOCKS_H[rn](x, w, y, in, out, j, r0);
    }
}
#endif

/* ---- One decoder layer of a Llama-architecture model for a few rows, in two calls ------------------------------
 * mtplab's "fused" step (mtplab/fastpath.py): the same formulas as transformers' LlamaDecoderLayer, with every
 * product done by the kernel above, so a layer costs two calls instead of ~25 small PyTorch ops. Each row is
 * computed on its own, in the same order whatever the number of rows: a verify pass over n tokens gives each row
 * exactly what a one-token step would. Keys and values are written straight into mtplab's KV cache buffers
 * (models.GrowingLayer.extend makes the room). The prefetch distance (PREFETCH_ROWS) was tuned on one Xeon and
 * checked on an AVX2 EPYC (Zen 3), where 4, 8 and 16 rows ahead were within noise and no prefetch 3-30% slower
 * for 1-8 rows; the block widths, and whether these layers are used at all, are measured on each machine
 * (mtplab.kernels).
 */
#include <math.h>
#include <stdlib.h>

static inline vf select_lanes(vfi mask, vf a, vf b) { return (vf)((mask & (vfi)a) | (~mask & (vfi)b)); }

/* exp(x) for VL floats at once (Cephes' expf: reduce by ln 2, a degree-6 polynomial, scale by 2^n; within 2 ulp of
 * expf). -inf gives exactly 0, NaN stays NaN. glibc's scalar expf, called ~85,000 times a token by the attention
 * softmax and SiLU, took ~3 ms of a 26 ms step. */
static inline vf vexp(vf x) {
    vf zero = {0}, one = zero + 1.0f;
    vfi neg_inf = x == zero - __builtin_inff();
    x = select_lanes(x < zero - 87.3f, zero - 87.3f, x);
    x = select_lanes(x > zero + 88.7f, zero + 88.7f, x);
    vf t = x * 1.44269504088896341f + 0.5f;
    vf fi = __builtin_convertvector(__builtin_convertvector(t, vfi), vf);
    fi -= (vf)((fi > t) & (vfi)one);  /* floor */
    x = x - fi * 0.693359375f + fi * 2.12194440e-4f;
    vf z = x * x;
    vf y = ((((((1.9875691500E-4f * x + 1.3981999507E-3f) * x + 8.3334519073E-3f) * x + 4.1665795894E-2f) * x
               + 1.6666665459E-1f) * x + 5.0000001201E-1f) * z + x + 1.0f);
    vf scale = (vf)((__builtin_convertvector(fi, vfi) + 127) << 23);
    return select_lanes(neg_inf, zero, y * scale);
}

/* a[i] = exp(a[i]) for i < len: VL at a time, the tail through the same code (every element gets the same result
 * wherever it sits). */
static void exp_inplace(float *a, long len) {
    long i = 0;
    for (; i + VL <= len; i += VL) {
        vf v = vexp(load(a + i));
        memcpy(a + i, &v, sizeof v);
    }
    if (i < len) {
        vf v = {0};
        memcpy(&v, a + i, sizeof(float) * (len - i));
        v = vexp(v);
        memcpy(a + i, &v, sizeof(float) * (len - i));
    }
}

/* sum(a[i] * b[i]) in VL lanes, then the lanes in a fixed order (the compiler may not reorder a float sum). */
static float dot(const float *a, const float *b, long len) {
    vf acc = {0};
    long i = 0;
    for (; i + VL <= len; i += VL) acc = madd(load(a + i), load(b + i), acc);
    float s = 0;
    for (int l = 0; l < VL; l++) s += acc[l];
    for (; i < len; i++) s = madd1(a[i], b[i], s);
    return s;
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, as LlamaRMSNorm (float32 throughout). */
static void rms_norm(const float *x, const float *w, float *out, long n, long H, float eps) {
    for (long r = 0; r < n; r++) {
        const float *xr = x + r * H;
        float ss = dot(xr, xr, H);
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (long i = 0; i < H; i++) out[r * H + i] = w[i] * (xr[i] * inv);
    }
}

/* The rotary embedding on heads [n, heads, D] in place: t*cos + rotate_half(t)*sin, cos/sin: [n, D]. */
static void rope(float *t, long n, long heads, long D, const float *cos_, const float *sin_) {
    long half = D / 2;
    for (long r = 0; r < n; r++)
        for (long h = 0; h < heads; h++) {
            float *v = t + (r * heads + h) * D;
            const float *c = cos_ + r * D, *s = sin_ + r * D;
            for (long i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + (-b) * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}

/* Attention input: h = norm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T; rotary on q and k. x: [n, H]; q: [n, Hq*D].
 * k and v go straight into the KV cache's buffers kc, vc ([Hkv, rows, D], head stride hs) at rows past..past+n-1. */
void mtplab_attn_in(const float *x, long n, long H, const float *ln, float eps, const float *wq, const float *wk,
                    const float *wv, long Hq, long Hkv, long D, const float *cos_, const float *sin_, float *q,
                    float *kc, float *vc, long hs, long past, int threads) {
    float *h = malloc(sizeof(float) * n * H), *k = malloc(sizeof(float) * n * Hkv * D);
    float *v = malloc(sizeof(float) * n * Hkv * D);
    rms_norm(x, ln, h, n, H, eps);
    mtplab_few_rows_linear(h, wq, q, n, H, Hq * D, threads);
    mtplab_few_rows_linear(h, wk, k, n, H, Hkv * D, threads);
    mtplab_few_rows_linear(h, wv, v, n, H, Hkv * D, threads);
    rope(q, n, Hq, D, cos_, sin_);
    rope(k, n, Hkv, D, cos_, sin_);
    for (long r = 0; r < n; r++)
        for (long j = 0; j < Hkv; j++) {
            memcpy(kc + j * hs + (past + r) * D, k + (r * Hkv + j) * D, sizeof(float) * D);
            memcpy(vc + j * hs + (past + r) * D, v + (r * Hkv + j) * D, sizeof(float) * D);
        }
    free(h); free(k); free(v);
}

/* Attention output and MLP, updating the residual stream x [n, H] in place:
 *   o = softmax(q K^T * scale + mask) V (grouped-query heads: head j reads key/value head j / (Hq / Hkv));
 *   x += o Wo^T;  h = norm(x);  x += (silu(h Wg^T) * (h Wu^T)) Wd^T.
 * K, V: [Hkv, L, D] with head stride `hs` (row stride D): the cache's rows, the last n of them this pass's.
 * sees: [n, L] bytes (1: row may attend), or NULL for the causal chain (row r sees the first L - n + r + 1). */
void mtplab_attn_out(float *x, long n, long H, const float *q, const float *K, const float *V, long L, long hs,
                     long Hq, long Hkv, long D, float scale, const unsigned char *sees, const float *wo,
                     const float *ln, float eps, const float *wg, const float *wu, const float *wd, long I,
                     int threads) {
    float *o = malloc(sizeof(float) * n * Hq * D), *tmp = malloc(sizeof(float) * n * (H > I ? H : I));
    float *g = malloc(sizeof(float) * n * I), *u = malloc(sizeof(float) * n * I);
    float *p = malloc(sizeof(float) * n * Hq * L);
    long group = Hq / Hkv;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < n * Hq; t++) {
        long r = t / Hq, hq = t % Hq;
        const float *qr = q + (r * Hq + hq) * D, *Kh = K + (hq / group) * hs, *Vh = V + (hq / group) * hs;
        float *pr = p + t * L, *orow = o + (r * Hq + hq) * D;
        long limit = sees ? L : L - n + r + 1;  /* the keys this row may see are the first `limit` */
        for (long j0 = 0; j0 + 4 <= limit; j0 += 4) block_4_1(qr, Kh, pr, D, 0, j0, 0);  /* 4 scores at a time */
        for (long j = limit & ~3L; j < limit; j++) block_1_1(qr, Kh, pr, D, 0, j, 0);
        float mx = -INFINITY;
        for (long j = 0; j < limit; j++) {
            pr[j] = sees && !sees[r * L + j] ? -INFINITY : pr[j] * scale;
            if (pr[j] > mx) mx = pr[j];
        }
        for (long j = 0; j < limit; j++) pr[j] -= mx;
        exp_inplace(pr, limit);  /* masked scores (-inf) become exactly 0 */
        float sum = 0;
        for (long j = 0; j < limit; j++) sum += pr[j];
        for (long i = 0; i < D; i++) orow[i] = 0;
        for (long j = 0; j < limit; j++) {
            if (pr[j] == 0.0f) continue;
            float w = pr[j] / sum;
            for (long i = 0; i < D; i++) orow[i] += w * Vh[j * D + i];
        }
    }
    mtplab_few_rows_linear(o, wo, tmp, n, Hq * D, H, threads);
    for (long i = 0; i < n * H; i++) x[i] += tmp[i];
    float *h = o;  /* o is no longer needed: reuse it for the normed rows (Hq * D >= H for Llama) */
    if (Hq * D < H) h = realloc(o, sizeof(float) * n * H), o = h;
    rms_norm(x, ln, h, n, H, eps);
    mtplab_few_rows_linear(h, wg, g, n, H, I, threads);
    mtplab_few_rows_linear(h, wu, u, n, H, I, threads);
    for (long i = 0; i < n * I; i++) tmp[i] = -g[i];  /* silu(g) * u = g / (1 + exp(-g)) * u */
    exp_inplace(tmp, n * I);
    for (long i = 0; i < n * I; i++) g[i] = g[i] / (1.0f + tmp[i]) * u[i];
    mtplab_few_rows_linear(g, wd, tmp, n, I, H, threads);
    for (long i = 0; i < n * H; i++) x[i] += tmp[i];
    free(o); free(tmp); free(g); free(u); free(p);
}

/* ---- One drafting step of mtplab's MTP head, from float16 weights ---------------------------------------------
 * MTPHead (mtplab/drafters/mtp.py, without the context-attention block) and the draft logits for n rows, in one
 * call instead of ~40 PyTorch ops, reading the head's weights in float16 (as it ships: the same values) and the
 * draft vocabulary's rows of the target's LM head in float16 (rounded), with float32 arithmetic:
 *   x = [norm_h(h); norm_e(e)] Wp^T;   per block b: y = norm_b(x), x += (silu(y Wg_b^T) * (y Wu_b^T)) Wd_b^T;
 *   s = norm_out(x);   logits = s Wlm^T.
 * h, e, s: [n, H]; logits: [n, V]; norms: [blocks + 3, H] (norm_h, norm_e, the blocks', norm_out); wp: [H, 2H];
 * wg, wu: [blocks, I, H]; wd: [blocks, H, I]; wlm: [V, H]. Whether it is used is measured on each machine
 * (MTPDrafter.bind). */
#ifdef __FLT16_MAX__
void mtplab_mtp_step(const float *h, const float *e, long n, long H, long I, long blocks, long V, const float *norms,
                     float eps, const _Float16 *wp, const _Float16 *wg, const _Float16 *wu, const _Float16 *wd,
                     const _Float16 *wlm, float *s, float *logits, int threads) {
    float *in = malloc(sizeof(float) * n * 2 * H), *x = malloc(sizeof(float) * n * H);
    float *y = malloc(sizeof(float) * n * H), *g = malloc(sizeof(float) * n * I), *u = malloc(sizeof(float) * n * I);
    float *t = malloc(sizeof(float) * n * I);
    for (long r = 0; r < n; r++) {
        rms_norm(h + r * H, norms, in + r * 2 * H, 1, H, eps);
        rms_norm(e + r * H, norms + H, in + r * 2 * H + H, 1, H, eps);
    }
    mtplab_few_rows_linear_f16(in, wp, x, n, 2 * H, H, threads);
    for (long b = 0; b < blocks; b++) {
        rms_norm(x, norms + (2 + b) * H, y, n, H, eps);
        mtplab_few_rows_linear_f16(y, wg + b * I * H, g, n, H, I, threads);
        mtplab_few_rows_linear_f16(y, wu + b * I * H, u, n, H, I, threads);
        for (long i = 0; i < n * I; i++) t[i] = -g[i];  /* silu(g) * u = g / (1 + exp(-g)) * u */
        exp_inplace(t, n * I);
        for (long i = 0; i < n * I; i++) g[i] = g[i] / (1.0f + t[i]) * u[i];
        mtplab_few_rows_linear_f16(g, wd + b * H * I, y, n, I, H, threads);
        for (long i = 0; i < n * H; i++) x[i] += y[i];
    }
    rms_norm(x, norms + (2 + blocks) * H, s, n, H, eps);
    mtplab_few_rows_linear_f16(s, wlm, logits, n, H, V, threads);
    free(in); free(x); free(y); free(g); free(u); free(t);
}
#endif
