/* AdamW over flat fp32 host buffers, one pass per buffer: read p, g, m, v (16 B), write p, m,
 * v (12 B) and, when asked, the updated weight as bf16 (2 B) in the same pass, so the copy-out
 * to the device's dtype costs no second sweep over memory. The gradient is multiplied by
 * `grad_scale` on the way in (clipping coefficient, loss-scale inverse, accumulation divisor).
 *
 * Same math as torch.optim.AdamW (decoupled weight decay, bias corrections). Every element is
 * independent and compiled without FMA contraction (-ffp-contract=off), so the bits do not
 * depend on the thread count or on where a thread's chunk starts.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define CHUNK 2048 /* elements: 4 fp32 streams + 1 bf16 = 36 KiB, about L1 */

static inline uint16_t to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* NaN stays NaN */
    x += 0x7fffu + ((x >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(x >> 16);
}

void adamw_step(float *restrict p, const float *restrict g, float *restrict m,
                float *restrict v, uint16_t *restrict out_bf16, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, float bias_c1,
                float bias_c2_sqrt, float grad_scale, int num_threads) {
    const float decay = 1.0f - lr * weight_decay;
    const float step_size = lr / bias_c1;
    const float one_b1 = 1.0f - beta1, one_b2 = 1.0f - beta2;
    /* Chunks small enough to stay in L1: update, then (bf16 models) convert the chunk just
     * written, so the copy-out reads from cache instead of making a second pass over memory. */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = c + CHUNK < n ? c + CHUNK : n;
        for (int64_t i = c; i < end; i++) {
            float gi = g[i] * grad_scale;
            float mi = m[i] + one_b1 * (gi - m[i]);
            float vi = beta2 * v[i] + one_b2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bias_c2_sqrt + eps);
        }
        if (!out_bf16) continue;
        int64_t i = c;
#ifdef __AVX512BF16__
        /* One instruction per 16 weights, round to nearest even (denormals become 0). The
         * stores stream past the cache: the copy is not read here, and a normal store would
         * first read each line it writes (2 bytes more per weight on top of 30). */
        for (; i < end && ((uintptr_t)(out_bf16 + i) & 31); i++) out_bf16[i] = to_bf16(p[i]);
        for (; i + 16 <= end; i += 16)
            _mm256_stream_si256((__m256i *)(out_bf16 + i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + i)));
        _mm_sfence(); /* the streamed lines are visible before the step returns */
#endif
        for (; i < end; i++) out_bf16[i] = to_bf16(p[i]);
    }
}

/* dst += src, src bf16: the gradient of a bf16 model into its fp32 buffer, each gradient as
 * it arrives from the device. bf16 to fp32 is exact (the 16 bits shifted up), so the sum is
 * the one torch's add_ gives, bit for bit; torch's mixed-dtype add converts element by
 * element and runs at about a fifth of this on 2 cores. */
void grad_add_bf16(float *restrict dst, const uint16_t *restrict src, int64_t n,
                   int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = c + CHUNK < n ? c + CHUNK : n;
        for (int64_t i = c; i < end; i++) {
            uint32_t x = (uint32_t)src[i] << 16;
            float f;
            memcpy(&f, &x, 4);
            dst[i] += f;
        }
    }
}

/* Sum of squares in fixed blocks of 65,536 (double partial sums), added in block order: the
 * same result for any thread count. */
#define BLOCK 65536
double sum_squares(const float *restrict g, int64_t n, int num_threads) {
    int64_t num_blocks = (n + BLOCK - 1) / BLOCK;
    double total = 0.0;
    double partial_stack[256];
    double *partial = num_blocks <= 256 ? partial_stack : 0;
    if (!partial) { /* large buffers: accumulate chunk by chunk of 256 blocks */
        for (int64_t b0 = 0; b0 < num_blocks; b0 += 256) {
            int64_t end = b0 + 256 < num_blocks ? b0 + 256 : num_blocks;
            int64_t lo = b0 * BLOCK, hi = end * BLOCK < n ? end * BLOCK : n;
            total += sum_squares(g + lo, hi - lo, num_threads);
        }
        return total;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < num_blocks; b++) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        double s = 0.0;
        for (int64_t i = lo; i < hi; i++) s += (double)g[i] * (double)g[i];
        partial[b] = s;
    }
    for (int64_t b = 0; b < num_blocks; b++) total += partial[b];
    return total;
}

/* The memory floor: AdamW's access pattern (read 4 streams, write 3) with trivial math. */
void access_probe(float *restrict p, const float *restrict g, float *restrict m,
                  float *restrict v, int64_t n, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] = m[i] + gi;
        v[i] = v[i] + gi;
        p[i] = p[i] - gi;
    }
}
