/* The TESKD loss on the CPU, fused: one pass per batch row computes every head's cross-entropy, every student's
 * KL divergence from the teacher, the feature term, and the gradients of all logits and (on request) of the
 * student features: the same closed form as teskd_fast/loss/closed_form.py and the Triton kernel. teskd_feature_grad
 * recomputes the feature gradient (a second backward), teskd_scale applies grad_output.
 *
 * Built at first use by kernels/teskd_loss_cpu.py (plain C, no Python or torch headers) and called through ctypes,
 * which releases the GIL: row ranges may run on several threads. Two instantiations of teskd_loss_cpu_impl.h:
 * float (vector exp/log polynomials below, about 1 ulp) and double (libm, for float64 inputs and tests).
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

/* Options shared by both instantiations. teskd_loss_cpu.py reads this declaration for its ctypes.Structure and
 * checks it against the loss's specification (kernels/options.py): one field per option, int64_t or double. */
typedef struct {
    int64_t K, B, C, D;          /* students, batch, classes, feature width (0: no feature term) */
    int64_t row_begin, row_end;  /* the rows this call computes */
    int64_t ignore_index;
    int64_t detach_teacher;
    double temperature, ce_weight, kd_weight, feat_weight, kd_eps, label_smoothing;
} teskd_options;

/* One vector is one hardware register: 64 bytes with AVX-512, 32 with AVX2, 16 elsewhere (SSE2, NEON, ...). At
 * that width every vector-extension operation maps to one instruction. (Wider vectors than the registers are
 * split by the compiler, but GCC splits comparisons, their masks and the int <-> float conversions lane by lane:
 * the AVX2 and SSE2 builds of 64-byte code ran scalar compares and inserts for every feature element and every
 * exp/log select.) */
#if defined(__AVX512F__)
#define TESKD_VBYTES 64
#elif defined(__AVX2__)
#define TESKD_VBYTES 32
#else
#define TESKD_VBYTES 16
#endif
#define TESKD_W32 (TESKD_VBYTES / 4) /* float lanes: 16, 8 or 4 */
#define TESKD_W64 (TESKD_VBYTES / 8) /* double lanes: 8, 4 or 2 */
typedef float v_f32 __attribute__((vector_size(TESKD_VBYTES)));
typedef int32_t vi_f32 __attribute__((vector_size(TESKD_VBYTES)));
typedef double v_f64 __attribute__((vector_size(TESKD_VBYTES)));
typedef int64_t vi_f64 __attribute__((vector_size(TESKD_VBYTES)));

static inline v_f32 vsel32(vi_f32 mask, v_f32 a, v_f32 b) {
    vi_f32 ai, bi;
    memcpy(&ai, &a, sizeof a);
    memcpy(&bi, &b, sizeof b);
    vi_f32 ri = (mask & ai) | (~mask & bi);
    v_f32 r;
    memcpy(&r, &ri, sizeof r);
    return r;
}

/* exp(x) for x <= 88 (here x <= 0 always: logits minus their row maximum): Cephes' range reduction and degree-6
 * polynomial, about 1 ulp. x below about -87.4 (-inf included) gives 0 (2^n for n <= -127 is taken as 0); NaN
 * propagates (a comparison with NaN is false, and NaN * 0 is NaN). With AVX-512, vscalefps applies 2^n. */
static inline v_f32 vexp_f32(v_f32 x) {
    const v_f32 zero = {0};
#ifdef __AVX512F__
    const v_f32 xc = (v_f32)_mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x); /* NaN passes through */
#else
    const v_f32 lo = zero - 88.0f;
    const v_f32 xc = vsel32(x < lo, lo, x);
#endif
    const v_f32 n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    v_f32 r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v_f32 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
#ifdef __AVX512F__
    return (v_f32)_mm512_scalef_ps((__m512)p, (__m512)n); /* p 2^n; underflows to 0 below 2^-149 */
#else
    vi_f32 ni = __builtin_convertvector(n, vi_f32);
    const vi_f32 small = ni < -127;
    ni = (small & -127) | (~small & ni);
    const vi_f32 bits = (ni + 127) << 23; /* 2^n, n in [-127, 127]; 2^-127 is encoded as 0 */
    v_f32 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
#endif
}

/* log(x): Cephes' polynomial on the mantissa, about 1 ulp. x = 0 gives -inf, x < 0 or NaN gives NaN, +inf gives
 * +inf, subnormal x is exact too. With AVX-512, vgetexpps / vgetmantps split x (subnormals and specials included). */
static inline v_f32 vlog_f32(v_f32 x) {
    const v_f32 zero = {0}, one = zero + 1.0f;
#ifdef __AVX512F__
    __m512 mant = _mm512_getmant_ps((__m512)x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan); /* [1, 2); NaN if x < 0 */
    __m512 expo = _mm512_getexp_ps((__m512)x); /* floor(log2 x); -inf for 0, +inf for +inf */
    const __mmask16 above = _mm512_cmp_ps_mask(mant, _mm512_set1_ps(1.41421356237309505f), _CMP_GT_OQ);
    mant = _mm512_mask_mul_ps(mant, above, mant, _mm512_set1_ps(0.5f)); /* [sqrt(1/2), sqrt(2)) */
    expo = _mm512_mask_add_ps(expo, above, expo, _mm512_set1_ps(1.0f));
    const v_f32 m = (v_f32)mant - one, e = (v_f32)expo;
#else
    const vi_f32 sub = x < 1.17549435e-38f; /* FLT_MIN */
    const v_f32 xs = vsel32(sub, x * 8388608.0f, x); /* 2^23 */
    vi_f32 ix;
    memcpy(&ix, &xs, sizeof ix);
    v_f32 e = __builtin_convertvector(((ix >> 23) & 0xff) - 126, v_f32) + vsel32(sub, zero - 23.0f, zero);
    const vi_f32 mbits = (ix & 0x007fffff) | 0x3f000000;
    v_f32 m; /* [0.5, 1) */
    memcpy(&m, &mbits, sizeof m);
    const vi_f32 below = m < 0.707106781186547524f;
    e = vsel32(below, e - one, e);
    m = vsel32(below, m + m - one, m - one);
#endif
    const v_f32 z = m * m;
    v_f32 y = zero + 7.0376836292e-2f;
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
    v_f32 res = m + y + e * 0.693359375f;
#ifdef __AVX512F__
    __m512 r = _mm512_mask_mov_ps((__m512)res, _mm512_cmp_ps_mask((__m512)x, _mm512_setzero_ps(), _CMP_EQ_OQ),
                                  _mm512_set1_ps(-INFINITY));
    r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), (__m512)x);
    return (v_f32)r;
#else
    res = vsel32(x == (zero + INFINITY), x, res);
    res = vsel32(x > zero, res, vsel32(x == zero, zero - INFINITY, zero + NAN));
    return res;
#endif
}

/* Horizontal sums and maxima as trees of half-width operations: in registers where the compiler has
 * __builtin_shufflevector (GCC >= 12, Clang), through memory otherwise. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define TESKD_SHUFFLE 1
typedef float v8_f32 __attribute__((vector_size(32)));
typedef float v4_f32 __attribute__((vector_size(16)));
typedef double v4_f64 __attribute__((vector_size(32)));
typedef double v2_f64 __attribute__((vector_size(16)));

/* A register folded down to 16 bytes, its halves combined with op (a macro). */
#if TESKD_VBYTES == 64
#define TESKD_HALVE32(v, op)                                   \
    op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), \
       __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15))
#define TESKD_HALVE64(v, op) op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7))
#define TESKD_TO16_32(v, op) (__extension__({ v8_f32 h8_ = TESKD_HALVE32(v, op); \
    op(__builtin_shufflevector(h8_, h8_, 0, 1, 2, 3), __builtin_shufflevector(h8_, h8_, 4, 5, 6, 7)); }))
#define TESKD_TO16_64(v, op) (__extension__({ v4_f64 h4_ = TESKD_HALVE64(v, op); \
    op(__builtin_shufflevector(h4_, h4_, 0, 1), __builtin_shufflevector(h4_, h4_, 2, 3)); }))
#elif TESKD_VBYTES == 32
#define TESKD_TO16_32(v, op) op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7))
#define TESKD_TO16_64(v, op) op(__builtin_shufflevector(v, v, 0, 1), __builtin_shufflevector(v, v, 2, 3))
#else
#define TESKD_TO16_32(v, op) (v)
#define TESKD_TO16_64(v, op) (v)
#endif
#endif

#define TESKD_ADD(a, b) ((a) + (b))

static inline float hsum_f32(v_f32 v) {
#ifdef TESKD_SHUFFLE
    const v4_f32 b = TESKD_TO16_32(v, TESKD_ADD);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float t[TESKD_W32];
    memcpy(t, &v, sizeof t);
    for (int w = TESKD_W32 / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) t[j] += t[j + w];
    return t[0];
#endif
}

/* The first n < W values at p as a vector, the other lanes pad; and the first n lanes of v stored at p; nothing
 * beyond p + n is touched. AVX-512: masked loads and stores. AVX2: vmaskmov (no fault on the masked-off lanes)
 * and a blend. Elsewhere (W = 4 floats or 2 doubles): lane by lane, at most 3 scalar moves (unrolled by hand: as a
 * loop, GCC turns them into a call to memcpy through the stack). n = W (the polynomial checks' last block) loads
 * the whole vector. */
#ifdef __AVX2__
/* Lanes j < n all ones, for vmaskmov (n in [0, 8]). */
static inline __m256i lanes_below(int64_t n, __m256i lane) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane);
}
#endif

static inline v_f32 vload_tail_f32(const float* p, int64_t n, float pad) {
#if defined(__AVX512F__)
    return (v_f32)_mm512_mask_loadu_ps(_mm512_set1_ps(pad), (__mmask16)((1u << n) - 1), p);
#elif defined(__AVX2__)
    const __m256i m = lanes_below(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return (v_f32)_mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
#else
    v_f32 v = (v_f32){0} + pad;
    switch (n) {
        case 4:
            memcpy(&v, p, sizeof v);
            break;
        case 3:
            v[2] = p[2];
            /* fall through */
        case 2:
            v[1] = p[1];
            /* fall through */
        case 1:
            v[0] = p[0];
            /* fall through */
        default:
            break;
    }
    return v;
#endif
}

static inline void vstore_tail_f32(float* p, v_f32 v, int64_t n) {
#if defined(__AVX512F__)
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(p, lanes_below(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), (__m256)v);
#else
    switch (n) {
        case 4:
            memcpy(p, &v, sizeof v);
            break;
        case 3:
            p[2] = v[2];
            /* fall through */
        case 2:
            p[1] = v[1];
            /* fall through */
        case 1:
            p[0] = v[0];
            /* fall through */
        default:
            break;
    }
#endif
}

static inline v_f64 vload_tail_f64(const double* p, int64_t n, double pad) {
#if defined(__AVX512F__)
    return (v_f64)_mm512_mask_loadu_pd(_mm512_set1_pd(pad), (__mmask8)((1u << n) - 1), p);
#elif defined(__AVX2__)
    const __m256i m = lanes_below(2 * n, _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7)); /* both halves of a lane */
    return (v_f64)_mm256_blendv_pd(_mm256_set1_pd(pad), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
#else
    v_f64 v = (v_f64){0} + pad;
    if (n >= 2)
        memcpy(&v, p, sizeof v);
    else if (n == 1)
        v[0] = p[0];
    return v;
#endif
}

static inline void vstore_tail_f64(double* p, v_f64 v, int64_t n) {
#if defined(__AVX512F__)
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
#elif defined(__AVX2__)
    _mm256_maskstore_pd(p, lanes_below(2 * n, _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7)), (__m256d)v);
#else
    if (n >= 2)
        memcpy(p, &v, sizeof v);
    else if (n == 1)
        p[0] = v[0];
#endif
}

/* Lane-wise maximum (a > b ? a : b, so b where either is NaN: the caller's NaN checks come later) and the
 * horizontal maximum. */
static inline v_f32 vmax_f32(v_f32 a, v_f32 b) {
#if defined(__AVX512F__)
    return (v_f32)_mm512_max_ps((__m512)b, (__m512)a);
#elif defined(__AVX2__)
    return (v_f32)_mm256_max_ps((__m256)b, (__m256)a);
#else
    return vsel32(a > b, a, b);
#endif
}

static inline v_f64 vmax_f64(v_f64 a, v_f64 b) {
#if defined(__AVX512F__)
    return (v_f64)_mm512_max_pd((__m512d)b, (__m512d)a);
#elif defined(__AVX2__)
    return (v_f64)_mm256_max_pd((__m256d)b, (__m256d)a);
#else
    vi_f64 mask = a > b, ai, bi;
    memcpy(&ai, &a, sizeof a);
    memcpy(&bi, &b, sizeof b);
    vi_f64 ri = (mask & ai) | (~mask & bi);
    memcpy(&a, &ri, sizeof a);
    return a;
#endif
}

static inline float max1_f32(float a, float b) { return b > a ? b : a; }
static inline double max1_f64(double a, double b) { return b > a ? b : a; }

static inline float hmax_f32(v_f32 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps((__m512)v);
#else /* once per head and row: through memory */
    float t[TESKD_W32];
    memcpy(t, &v, sizeof t);
    for (int w = TESKD_W32 / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) t[j] = max1_f32(t[j], t[j + w]);
    return t[0];
#endif
}

static inline double hsum_f64(v_f64 v) {
#if defined(TESKD_SHUFFLE) && TESKD_VBYTES >= 32
    const v2_f64 a = TESKD_TO16_64(v, TESKD_ADD);
    return a[0] + a[1];
#else
    double t[TESKD_W64];
    memcpy(t, &v, sizeof t);
    for (int w = TESKD_W64 / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) t[j] += t[j + w];
    return t[0];
#endif
}

static inline double hmax_f64(v_f64 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_pd((__m512d)v);
#else /* once per head and row: through memory */
    double t[TESKD_W64];
    memcpy(t, &v, sizeof t);
    for (int w = TESKD_W64 / 2; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) t[j] = max1_f64(t[j], t[j + w]);
    return t[0];
#endif
}

/* float64 (inputs of that dtype, and the tests): libm, lane by lane. */
static inline v_f64 vexp_f64(v_f64 x) {
    for (int j = 0; j < TESKD_W64; ++j) x[j] = exp(x[j]);
    return x;
}

static inline v_f64 vlog_f64(v_f64 x) {
    for (int j = 0; j < TESKD_W64; ++j) x[j] = log(x[j]);
    return x;
}

#define R float
#define V v_f32
#define VI vi_f32
#define VEXP vexp_f32
#define VLOG vlog_f32
#define VHSUM hsum_f32
#define VHMAX hmax_f32
#define VMAX vmax_f32
#define VLOAD_TAIL vload_tail_f32
#define VSTORE_TAIL vstore_tail_f32
#define SUFFIX f32
#include "teskd_loss_cpu_impl.h"
#undef R
#undef V
#undef VI
#undef VEXP
#undef VLOG
#undef VHSUM
#undef VHMAX
#undef VMAX
#undef VLOAD_TAIL
#undef VSTORE_TAIL
#undef SUFFIX

#define R double
#define V v_f64
#define VI vi_f64
#define VEXP vexp_f64
#define VLOG vlog_f64
#define VHSUM hsum_f64
#define VHMAX hmax_f64
#define VMAX vmax_f64
#define VLOAD_TAIL vload_tail_f64
#define VSTORE_TAIL vstore_tail_f64
#define SUFFIX f64
#include "teskd_loss_cpu_impl.h"
#undef R
#undef V
#undef VI
#undef VEXP
#undef VLOG
#undef VHSUM
#undef VHMAX
#undef VMAX
#undef VLOAD_TAIL
#undef VSTORE_TAIL
#undef SUFFIX

/* Checks of the polynomials, used by the tests: out[i] = exp(x[i]) or log(x[i]) in float. */
void teskd_exp_f32(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i += TESKD_W32) {
        const int64_t m = n - i < TESKD_W32 ? n - i : TESKD_W32;
        vstore_tail_f32(out + i, vexp_f32(vload_tail_f32(x + i, m, 0.0f)), m);
    }
}

void teskd_log_f32(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i += TESKD_W32) {
        const int64_t m = n - i < TESKD_W32 ? n - i : TESKD_W32;
        vstore_tail_f32(out + i, vlog_f32(vload_tail_f32(x + i, m, 1.0f)), m);
    }
}

int64_t teskd_abi_version(void) { return 2; }

/* The widest vector instruction set this build targets (which branches above are compiled in). */
const char* teskd_isa(void) {
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__SSE2__)
    return "sse2";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "scalar";
#endif
}
