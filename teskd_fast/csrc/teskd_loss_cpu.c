/* The TESKD loss on the CPU, fused: one pass per batch row computes every head's cross-entropy, every student's
 * KL divergence from the teacher, the feature term, and the gradients of all inputs (../shared/SPEC.md, "Loss";
 * the same closed form as teskd_fast/closed_form.py and the Triton kernel).
 *
 * Built at first use by teskd_fast/cpu_kernel.py (plain C, no Python or torch headers) and called through ctypes,
 * which releases the GIL: row ranges may run on several threads. Two instantiations of teskd_loss_cpu_impl.h:
 * float (vectorisable exp/log polynomials below, about 1 ulp) and double (libm, for float64 inputs and tests).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Options shared by both instantiations; mirrored by a ctypes.Structure in cpu_kernel.py (keep in step). */
typedef struct {
    int64_t K, B, C, D;          /* students, batch, classes, feature width (0: no feature term) */
    int64_t row_begin, row_end;  /* the rows this call computes */
    int64_t ignore_index;
    int64_t detach_teacher;
    double temperature, ce_weight, kd_weight, feat_weight, kd_eps, label_smoothing;
} teskd_options;

static inline float bits_to_float(int32_t i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

static inline int32_t float_to_bits(float f) {
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return i;
}

/* exp(x) for x <= 88 (here x <= 0 always: logits minus their row maximum). Cephes' range reduction and
 * polynomial, branch-free so that loops over it vectorise: x below log(FLT_MIN) (-inf included) gives 0 through
 * a 0/1 factor rather than a select, which compilers would turn into masking the whole polynomial; NaN
 * propagates (NaN * 0 is NaN). */
static inline float exp_f32(float x) {
    const float lo = -87.33654475f;
    float xc = x < lo ? lo : x; /* comparisons are false for NaN: NaN passes through */
    xc = xc > 88.0f ? 88.0f : xc;
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    float scale = bits_to_float(((int32_t)n + 127) << 23); /* 2^n, n in [-126, 127] */
    return p * scale * (float)(x >= lo);
}

/* log(x): Cephes' polynomial on the mantissa, branch-free. x = 0 gives -inf, x < 0 or NaN gives NaN,
 * subnormal x is rescaled first. */
static inline float log_f32(float x) {
    const float tiny = 1.17549435e-38f; /* FLT_MIN */
    float xs = x < tiny ? x * 8388608.0f : x; /* 2^23 */
    float e_adjust = x < tiny ? -23.0f : 0.0f;
    int32_t ix = float_to_bits(xs);
    float e = (float)(((ix >> 23) & 0xff) - 126) + e_adjust;
    float m = bits_to_float((ix & 0x007fffff) | 0x3f000000); /* [0.5, 1) */
    int below = m < 0.707106781186547524f;
    e = below ? e - 1.0f : e;
    m = below ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + e * -2.12194440e-4f;
    y = y - 0.5f * z;
    float res = m + y + e * 0.693359375f;
    res = x == INFINITY ? x : res;
    res = x > 0.0f ? res : (x == 0.0f ? -INFINITY : NAN);
    return res;
}

/* Values per vector block of the row loops (16 floats: one AVX-512 register). */
#define TESKD_BLOCK 16

#define R float
#define TESKD_TINY 1.17549435e-38 /* FLT_MIN */
#define EXP exp_f32
#define LOG log_f32
#define SUFFIX f32
#include "teskd_loss_cpu_impl.h"
#undef R
#undef TESKD_TINY
#undef EXP
#undef LOG
#undef SUFFIX

#define R double
#define TESKD_TINY 2.2250738585072014e-308 /* DBL_MIN */
#define EXP exp
#define LOG log
#define SUFFIX f64
#include "teskd_loss_cpu_impl.h"
#undef R
#undef TESKD_TINY
#undef EXP
#undef LOG
#undef SUFFIX

/* Checks of the polynomials, used by the tests: out[i] = exp(x[i]) or log(x[i]) in float. */
void teskd_exp_f32(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = exp_f32(x[i]);
}

void teskd_log_f32(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = log_f32(x[i]);
}

int64_t teskd_abi_version(void) { return 1; }
