/* y = x W^T for a few rows of x, reading each weight once: mtplab's "stream" kernel (see mtplab/kernels.py).
 *
 * W is the nn.Linear weight as PyTorch stores it: [out, in], row-major. For a block of 4 weight rows and up to 4
 * rows of x, 16 vector accumulators run along `in`; the 4 weight rows are loaded from memory once and stay in L1
 * while the other rows of x use them. Weight rows a few blocks ahead are prefetched, so the memory system is busy
 * while the block computes. Plain C with GCC/Clang vector extensions: the compiler maps v16 to AVX-512, AVX2, NEON
 * or scalar code for the machine it compiles on (-march=native). Results differ from MKL's only by the order of
 * float additions (about 1e-6 relative). Parallel over output blocks with OpenMP (PyTorch's own runtime when the
 * process already loaded it: the same soname, libgomp.so.1).
 */
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

/* Lane i of the result is the sum of all lanes of v[i]: 16 horizontal sums in 15 adds. */
static inline v16 reduce16(const v16 *v) {
    v16 c[8], e[4], g[2];
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
}

#define PREFETCH_ROWS 8

/* y[r0 .. r0+RN-1][j0 .. j0+3] */
#define BLOCK(RN)                                                                                          \
static void block_##RN(const float *x, const float *w, float *y, long in, long out, long j0, long r0) {    \
    v16 acc[16];                                                                                           \
    memset(acc, 0, sizeof acc);                                                                            \
    const float *w0 = w + j0 * in;                                                                         \
    long k = 0;                                                                                            \
    for (; k + 16 <= in; k += 16) {                                                                        \
        v16 wv[4], xv[RN];                                                                                 \
        for (int a = 0; a < 4; a++) {                                                                      \
            wv[a] = load(w0 + a * in + k);                                                                 \
            __builtin_prefetch(w0 + (a + PREFETCH_ROWS) * in + k);                                         \
        }                                                                                                  \
        for (int r = 0; r < RN; r++) xv[r] = load(x + (r0 + r) * in + k);                                  \
        for (int a = 0; a < 4; a++)                                                                        \
            for (int r = 0; r < RN; r++) acc[a * 4 + r] += wv[a] * xv[r];                                  \
    }                                                                                                      \
    v16 sums = reduce16(acc);                                                                              \
    for (int a = 0; a < 4; a++)                                                                            \
        for (int r = 0; r < RN; r++) {                                                                     \
            float s = sums[a * 4 + r];                                                                     \
            for (long kk = k; kk < in; kk++) s += w0[a * in + kk] * x[(r0 + r) * in + kk];                 \
            y[(r0 + r) * out + j0 + a] = s;                                                                \
        }                                                                                                  \
}
BLOCK(1)
BLOCK(2)
BLOCK(3)
BLOCK(4)

/* x: [n, in], w: [out, in], y: [n, out], all contiguous float32. */
void mtplab_few_rows_linear(const float *x, const float *w, float *y, long n, long in, long out, int threads) {
    long full = out & ~3L;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long j0 = 0; j0 < full; j0 += 4) {
        long r0 = 0;
        for (; r0 + 4 <= n; r0 += 4) block_4(x, w, y, in, out, j0, r0);
        switch (n - r0) {
            case 3: block_3(x, w, y, in, out, j0, r0); break;
            case 2: block_2(x, w, y, in, out, j0, r0); break;
            case 1: block_1(x, w, y, in, out, j0, r0); break;
        }
    }
    for (long j = full; j < out; j++)
        for (long r = 0; r < n; r++) {
            float s = 0;
            for (long k = 0; k < in; k++) s += w[j * in + k] * x[r * in + k];
            y[r * out + j] = s;
        }
}
