/* decodelab's "panels" product: y = x @ W.T for a float32 weight W (N, K) stored once as panels of 16 output columns
 * (packed[p][k][j] = W[16 p + j][k]), x (M, K) and y (M, N) row-major. Built at run time with the machine's own
 * instruction set (-march=native) by decodelab/fastpath/native.py, linked against PyTorch's OpenMP runtime.
 *
 * The register-blocked micro-kernel is the one of GotoBLAS / BLIS (Goto & van de Geijn, "Anatomy of
 * High-Performance Matrix Multiplication", ACM TOMS 34(3), 2008): a tile of up to 6 rows x 16 columns held in 12
 * AVX accumulators, one broadcast of x and two loads of the panel per k. Every output is one fused multiply-add
 * chain over k = 0 .. K-1 in order, whatever M is and wherever the row sits in the tile: a row's result is bit for
 * bit the same alone and among other rows.
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16 /* output columns per panel */
#define MR 6  /* rows per micro-kernel tile */
#define MC 96 /* rows per block: their packed copy (MC x K floats) stays in the core's L2 cache */
#define PREFETCH_ROWS 4 /* blocks of at least this many rows prefetch the next panel (fewer: memory-bound anyway,
                           and the extra prefetches cost 1-row products ~10 %) */

void dl_panels_pack(const float *w, float *packed, int64_t n, int64_t k) {
  for (int64_t p = 0; p < n / NR; p++)
    for (int64_t kk = 0; kk < k; kk++)
      for (int j = 0; j < NR; j++)
        packed[(p * k + kk) * NR + j] = w[(p * NR + j) * k + kk];
}

#define DECL(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
#define FMA(r)                                                                                                   \
  {                                                                                                              \
    __m256 av = _mm256_broadcast_ss(a + kk * ROWS + r);                                                          \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);                                                                  \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);                                                                  \
  }
#define STORE(r)                                                                                                 \
  _mm256_storeu_ps(y + (r) * ldy, c##r##0);                                                                      \
  _mm256_storeu_ps(y + (r) * ldy + 8, c##r##1);
#define R1(X) X(0)
#define R2(X) X(0) X(1)
#define R3(X) X(0) X(1) X(2)
#define R4(X) X(0) X(1) X(2) X(3)
#define R5(X) X(0) X(1) X(2) X(3) X(4)
#define R6(X) X(0) X(1) X(2) X(3) X(4) X(5)
/* Named accumulators, not an array: GCC keeps an array of vectors in memory across the k loop. */
#define KERNEL(R, LIST)                                                                                          \
  static void kernel##R(const float *a, const float *b, float *y, int64_t k, int64_t ldy, const float *pf) {    \
    enum { ROWS = R };                                                                                           \
    LIST(DECL)                                                                                                   \
    for (int64_t kk = 0; kk < k; kk++) {                                                                         \
      _mm_prefetch((const char *)(pf + NR * kk), _MM_HINT_T0);                                                   \
      __m256 b0 = _mm256_loadu_ps(b + NR * kk), b1 = _mm256_loadu_ps(b + NR * kk + 8);                           \
      LIST(FMA)                                                                                                  \
    }                                                                                                            \
    LIST(STORE)                                                                                                  \
  }
KERNEL(1, R1) KERNEL(2, R2) KERNEL(3, R3) KERNEL(4, R4) KERNEL(5, R5) KERNEL(6, R6)

static void kernel(int rows, const float *a, const float *b, float *y, int64_t k, int64_t ldy, const float *pf) {
  switch (rows) {
    case 1: kernel1(a, b, y, k, ldy, pf); break;
    case 2: kernel2(a, b, y, k, ldy, pf); break;
    case 3: kernel3(a, b, y, k, ldy, pf); break;
    case 4: kernel4(a, b, y, k, ldy, pf); break;
    case 5: kernel5(a, b, y, k, ldy, pf); break;
    default: kernel6(a, b, y, k, ldy, pf);
  }
}

/* Returns 0, or -1 when the row block's copy could not be allocated (y is then untouched). */
int dl_panels_mm(const float *x, const float *packed, float *y, int64_t m, int64_t n, int64_t k) {
  float *a = malloc(sizeof(float) * (size_t)(MC < m ? MC : m) * (size_t)k);
  if (a == NULL) return -1;
  int64_t panels = n / NR;
  for (int64_t m0 = 0; m0 < m; m0 += MC) {
    int64_t mc = m - m0 < MC ? m - m0 : MC;
    /* the block's rows, MR at a time, k-major: a[t][kk][r] = x[m0 + MR t + r][kk] */
    for (int64_t t = 0; t * MR < mc; t++) {
      int rows = mc - t * MR < MR ? (int)(mc - t * MR) : MR;
      float *dst = a + t * MR * k;
      const float *src = x + (m0 + t * MR) * k;
      for (int64_t kk = 0; kk < k; kk++)
        for (int r = 0; r < rows; r++) dst[kk * rows + r] = src[r * k + kk];
    }
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
      const float *b = packed + p * k * NR;
      /* while the first tile of rows runs over this panel, the next panel is fetched a cache line per k (the
       * hardware prefetcher alone left the product waiting on memory: 16 rows at ~half the in-cache speed); the last
       * panel and the later tiles prefetch their own, cached, panel */
      const float *next = p + 1 < panels && mc >= PREFETCH_ROWS ? b + k * NR : b;
      for (int64_t t = 0; t * MR < mc; t++) {
        int rows = mc - t * MR < MR ? (int)(mc - t * MR) : MR;
        kernel(rows, a + t * MR * k, b, y + (m0 + t * MR) * n + p * NR, k, n, t == 0 ? next : b);
      }
    }
  }
  free(a);
  return 0;
}
