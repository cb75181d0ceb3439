/* decodelab's decode-step attention over the slots of a cache pool (decodelab/fastpath/slot_attention.py): for every
 * row p of the step (one token of one request) and key/value head h, softmax(scale * q . K^T) V over the positions
 * [0, lengths[p]) of its slot where pad is set, for the g query heads sharing that key/value head. Each (row, head)
 * is computed alone, in the same order whatever the other rows, and only over the row's own positions: PyTorch's
 * SDPA over the pool reads every row's keys up to the longest request of the step (and sums in an order that
 * depends on that length). Built by decodelab/fastpath/native.py (-march=native, PyTorch's OpenMP runtime).
 *
 * The softmax is the usual safe one (maximum subtracted before exp), as flash attention's (Dao et al. 2022) final
 * result, computed in two passes: scores, then exp and sum, then the weighted sum of values.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* e^x for 8 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, as avx_mathfun's
 * exp256_ps), within ~2 ulp of expf on [-88, 88]; the inputs here are <= 0 (scores minus their maximum). */
static inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f));
  e = _mm256_slli_epi32(e, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
/* q (P, Hkv * g, D): the step's queries, query head j of kv head h at h * g + j (transformers' repeat_kv order);
 * keys / values (S, Hkv, C, D): a layer of the slot pool; pad (S, C) bool: the slots' real tokens;
 * slots (P,), lengths (P,): each row's slot and the positions its request holds (its new key included);
 * out (P, Hkv * g, D). Requires D % 8 == 0 and lengths[p] >= 1 with at least one real token.
 * Returns 0, or -1 when a thread could not allocate its scores (out is then incomplete). */
int dl_slot_attention(const float *q, const float *keys, const float *values, const uint8_t *pad,
                        const int64_t *slots, const int64_t *lengths, float *out,
                        int64_t P, int64_t hkv, int64_t g, int64_t C, int64_t D, float scale) {
  int64_t pairs = P * hkv;
  int fail = 0;
#pragma omp parallel
  {
    float *s = malloc(sizeof(float) * (size_t)(g * C + 8));
    if (s == NULL) {
#pragma omp atomic write
      fail = 1;
    }
#pragma omp for schedule(static)
    for (int64_t pr = 0; pr < pairs; pr++) {
      if (s == NULL) continue;
      int64_t p = pr / hkv, h = pr % hkv, slot = slots[p], len = lengths[p];
      const float *kb = keys + ((slot * hkv + h) * C) * D, *vb = values + ((slot * hkv + h) * C) * D;
      const uint8_t *mask = pad + slot * C;
      const float *qh = q + (p * hkv * g + h * g) * D;
      float *oh = out + (p * hkv * g + h * g) * D;
      float mx[16], sum[16];
      for (int64_t j = 0; j < g; j++) mx[j] = -INFINITY;
      for (int64_t l = 0; l < len; l++) {
        for (int64_t j = 0; j < g; j++) {
          float v = -INFINITY;
          if (mask[l]) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8)
              acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j * D + d), _mm256_loadu_ps(kb + l * D + d), acc);
            v = hsum(acc) * scale;
          }
          s[j * C + l] = v;
          if (v > mx[j]) mx[j] = v;
        }
      }
      for (int64_t j = 0; j < g; j++) {
        float *sj = s + j * C; __m256 m = _mm256_set1_ps(mx[j]), tot = _mm256_setzero_ps();
        int64_t l = 0;
        for (; l + 8 <= len; l += 8) { __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sj + l), m)); _mm256_storeu_ps(sj + l, e); tot = _mm256_add_ps(tot, e); }
        float t = hsum(tot);
        for (; l < len; l++) { sj[l] = expf(sj[l] - mx[j]); t += sj[l]; }
        sum[j] = t;
      }
      for (int64_t j = 0; j < g; j++) for (int64_t d = 0; d < D; d++) oh[j * D + d] = 0.f;
      for (int64_t l = 0; l < len; l++) {
        for (int64_t j = 0; j < g; j++) {
          __m256 w = _mm256_set1_ps(s[j * C + l]);
          for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(oh + j * D + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(vb + l * D + d), _mm256_loadu_ps(oh + j * D + d)));
        }
      }
      for (int64_t j = 0; j < g; j++) { __m256 inv = _mm256_set1_ps(1.0f / sum[j]);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(oh + j * D + d, _mm256_mul_ps(_mm256_loadu_ps(oh + j * D + d), inv)); }
    }
    free(s);
  }
  return fail ? -1 : 0;
}
