/* The host side of an offload step over flat buffers.
 *
 * adamw_fused: AdamW in one pass per buffer. The gradient is read where it was staged, in the
 * model's dtype (bf16, fp16 or fp32), plus the fp32 sum of earlier micro-steps when there is
 * one, and multiplied by `grad_scale` (clipping coefficient, loss-scale inverse, accumulation
 * divisor) on the way in; p, m, v are read and written; the new weight is written as bf16 in
 * the same pass when asked. Without accumulation that is 2 + 12 bytes read and 12 + 2 written
 * per parameter of a bf16 model: no fp32 gradient exists.
 *
 * stage_grad: a micro-step's gradient into its staging slot (the model's dtype), returning
 * the sum of squares of the whole gradient so far (the earlier micro-steps' sum plus this
 * one), so that clipping needs no pass of its own. `fold`: the slot still holds an earlier
 * micro-step, which is first added into the fp32 sum.
 *
 * Same math as torch.optim.AdamW (decoupled weight decay, bias corrections). Every element is
 * independent and compiled without FMA contraction (-ffp-contract=off), so the bits do not
 * depend on the thread count or on where a thread's chunk starts; sums of squares are taken
 * in double, in fixed blocks and lanes added in a fixed order: the same for any thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define CHUNK 2048  /* elements: 4 fp32 streams + 1 bf16 = 36 KiB, about L1 */
#define BLOCK 65536 /* elements per partial sum of squares */

enum { KIND_FP32 = 0, KIND_BF16 = 1, KIND_FP16 = 2 };

static inline uint16_t to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* NaN stays NaN */
    x += 0x7fffu + ((x >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(x >> 16);
}

static inline float from_half(uint16_t h) { /* exact: every fp16 value is an fp32 value */
#ifdef __FLT16_MAX__
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t x;
    if (exp == 0x1fu) x = sign | 0x7f800000u | (man << 13); /* inf, NaN */
    else if (exp) x = sign | ((exp + 112u) << 23) | (man << 13);
    else if (!man) x = sign;
    else { /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        x = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
#endif
}

/* Element i of a buffer of `kind`, as fp32 (exact). `kind` is a constant at every call site
 * after inlining, so each loop is compiled for one dtype. */
static inline float load(const void *restrict s, int kind, int64_t i) {
    if (kind == KIND_FP32) return ((const float *)s)[i];
    if (kind == KIND_BF16) {
        uint32_t x = (uint32_t)((const uint16_t *)s)[i] << 16;
        float f;
        memcpy(&f, &x, 4);
        return f;
    }
    return from_half(((const uint16_t *)s)[i]);
}

static inline void adam_chunk(float *restrict p, float *restrict m, float *restrict v,
                              const void *restrict g, int kind, const float *restrict acc,
                              int64_t c, int64_t end, float decay, float step_size,
                              float beta1, float beta2, float eps, float bias_c2_sqrt,
                              float grad_scale) {
    const float one_b1 = 1.0f - beta1, one_b2 = 1.0f - beta2;
    for (int64_t i = c; i < end; i++) {
        float gi = (acc ? acc[i] + load(g, kind, i) : load(g, kind, i)) * grad_scale;
        float mi = m[i] + one_b1 * (gi - m[i]);
        float vi = beta2 * v[i] + one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) / bias_c2_sqrt + eps);
    }
}

static inline void bf16_chunk(const float *restrict p, uint16_t *restrict out, int64_t c,
                              int64_t end) {
    int64_t i = c;
#ifdef __AVX512BF16__
    /* One instruction per 16 weights, round to nearest even (denormals become 0). The stores
     * stream past the cache: the copy is not read here, and a normal store would first read
     * each line it writes (2 bytes more per weight). */
    for (; i < end && ((uintptr_t)(out + i) & 31); i++) out[i] = to_bf16(p[i]);
    for (; i + 16 <= end; i += 16)
        _mm256_stream_si256((__m256i *)(out + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + i)));
    _mm_sfence(); /* the streamed lines are visible before the step returns */
#endif
    for (; i < end; i++) out[i] = to_bf16(p[i]);
}

#define ADAM_LOOP(KIND)                                                                      \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")                    \
    for (int64_t c = 0; c < n; c += CHUNK) {                                                 \
        int64_t end = c + CHUNK < n ? c + CHUNK : n;                                          \
        adam_chunk(p, m, v, g, KIND, acc, c, end, decay, step_size, beta1, beta2, eps,       \
                   bias_c2_sqrt, grad_scale);                                                 \
        /* bf16 models: the chunk just written, from cache, not a second pass over memory */ \
        if (out_bf16) bf16_chunk(p, out_bf16, c, end);                                       \
    }

void adamw_fused(float *restrict p, float *restrict m, float *restrict v,
                 const void *restrict g, int kind, const float *restrict acc,
                 uint16_t *restrict out_bf16, int64_t n, float lr, float beta1, float beta2,
                 float eps, float weight_decay, float bias_c1, float bias_c2_sqrt,
                 float grad_scale, int num_threads) {
    const float decay = 1.0f - lr * weight_decay;
    const float step_size = lr / bias_c1;
    if (kind == KIND_BF16) { ADAM_LOOP(KIND_BF16) }
    else if (kind == KIND_FP16) { ADAM_LOOP(KIND_FP16) }
    else { ADAM_LOOP(KIND_FP32) }
}

/* Sum over blocks of BLOCK elements, each a double sum in element order, added in block
 * order. BODY(lo, hi) returns block [lo, hi)'s sum and may write as it reads. */
#define BLOCKED_SUM(BODY)                                                                  \
    int64_t num_blocks = (n + BLOCK - 1) / BLOCK;                                          \
    double total = 0.0;                                                                    \
    for (int64_t b0 = 0; b0 < num_blocks; b0 += 256) {                                     \
        int64_t b1 = b0 + 256 < num_blocks ? b0 + 256 : num_blocks;                        \
        double partial[256];                                                               \
        _Pragma("omp parallel for num_threads(num_threads) schedule(static)")              \
        for (int64_t b = b0; b < b1; b++) {                                                \
            int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;                  \
            partial[b - b0] = BODY(lo, hi);                                                \
        }                                                                                  \
        for (int64_t b = b0; b < b1; b++) total += partial[b - b0];                        \
    }                                                                                      \
    return total;

/* A block's sum of squares in LANES independent double sums (element i into lane i mod
 * LANES, so the loop vectorizes), added in lane order: fixed for any thread count. */
#define LANES 32
static inline double lanes_total(const double *s) {
    double t = 0.0;
    for (int j = 0; j < LANES; j++) t += s[j];
    return t;
}

static inline double sq_block(const void *restrict g, int kind, const float *restrict acc,
                              int64_t lo, int64_t hi) {
    double s[LANES] = {0};
    int64_t i = lo;
    for (; i + LANES <= hi; i += LANES)
        for (int j = 0; j < LANES; j++) {
            double x = (double)(acc ? acc[i + j] + load(g, kind, i + j) : load(g, kind, i + j));
            s[j] += x * x;
        }
    for (int j = 0; i < hi; i++, j++) {
        double x = (double)(acc ? acc[i] + load(g, kind, i) : load(g, kind, i));
        s[j] += x * x;
    }
    return lanes_total(s);
}

/* The sum of squares of acc + g (g alone without acc). */
double grad_sumsq(const void *restrict g, int kind, const float *restrict acc, int64_t n,
                  int num_threads) {
#define SQ(lo, hi) (kind == KIND_BF16   ? sq_block(g, KIND_BF16, acc, lo, hi)   \
                    : kind == KIND_FP16 ? sq_block(g, KIND_FP16, acc, lo, hi)   \
                                        : sq_block(g, KIND_FP32, acc, lo, hi))
    BLOCKED_SUM(SQ)
#undef SQ
}

static inline double stage_block(void *restrict stage, int kind, const void *restrict src,
                                 float *restrict acc, int fold, int64_t lo, int64_t hi) {
    double s[LANES] = {0};
    int width = kind == KIND_FP32 ? 4 : 2;
    int64_t i = lo;
    if (fold)
        for (int64_t k = lo; k < hi; k++) acc[k] += load(stage, kind, k);
    for (; i + LANES <= hi; i += LANES)
        for (int j = 0; j < LANES; j++) {
            double x = (double)(acc ? acc[i + j] + load(src, kind, i + j) : load(src, kind, i + j));
            s[j] += x * x;
        }
    for (int j = 0; i < hi; i++, j++) {
        double x = (double)(acc ? acc[i] + load(src, kind, i) : load(src, kind, i));
        s[j] += x * x;
    }
    memcpy((char *)stage + lo * width, (const char *)src + lo * width, (hi - lo) * width);
    return lanes_total(s);
}

/* stage = src; returns the sum of squares of acc + src. `fold`: acc += stage first. */
double stage_grad(void *restrict stage, int kind, const void *restrict src,
                  float *restrict acc, int fold, int64_t n, int num_threads) {
#define ST(lo, hi) (kind == KIND_BF16   ? stage_block(stage, KIND_BF16, src, acc, fold, lo, hi) \
                    : kind == KIND_FP16 ? stage_block(stage, KIND_FP16, src, acc, fold, lo, hi) \
                                        : stage_block(stage, KIND_FP32, src, acc, fold, lo, hi))
    BLOCKED_SUM(ST)
#undef ST
}

/* dst += src (src of `kind`): a micro-step's gradient into the fp32 sum. The conversion is
 * exact, so the sum is the one torch's add_ gives, bit for bit; torch's mixed-dtype add
 * converts element by element and runs at about a fifth of this on 2 cores. */
void grad_add(float *restrict dst, const void *restrict src, int kind, int64_t n,
              int num_threads) {
#define ADD_LOOP(KIND)                                                                       \
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")                    \
    for (int64_t c = 0; c < n; c += CHUNK) {                                                 \
        int64_t end = c + CHUNK < n ? c + CHUNK : n;                                          \
        for (int64_t i = c; i < end; i++) dst[i] += load(src, KIND, i);                      \
    }
    if (kind == KIND_BF16) { ADD_LOOP(KIND_BF16) }
    else if (kind == KIND_FP16) { ADD_LOOP(KIND_FP16) }
    else { ADD_LOOP(KIND_FP32) }
#undef ADD_LOOP
}

/* The memory floor: AdamW's access pattern over fp32 (read 4 streams, write 3: 28 bytes per
 * element) with trivial math. */
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
