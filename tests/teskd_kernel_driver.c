/* A stand-alone check of the fused CPU kernel, for targets where Python and torch do not run (aarch64 under
 * qemu-user, in tests/test_cpu_kernel_isa.py) and for instruction counts (valgrind --tool=callgrind).
 *
 * Build: cc -O3 -std=c11 -ffp-contract=fast -fno-math-errno -I <csrc> teskd_kernel_driver.c -lm
 * Run:   ./driver CASES_FILE [REPEAT]
 *
 * CASES_FILE (written by the Python test, little-endian) holds cases one after the other, each:
 *   int64   sizeof(teskd_options), then the struct itself (the bytes of the ctypes mirror, teskd_loss_cpu._Options)
 *   float64 feature_scale, atol, rtol
 *   float64 head_weights[K + 1]
 *   float32 teacher[B C], students[K B C], f_t[B D], f_s[K B D];  int64 target[B]
 *   float64 expected total, parts[3], grad[(K + 1) B C], feature_grad[K B D]   (from the float64 reference)
 * and then one block of polynomial checks:
 *   int64 n; float32 x[n]; float64 exp(x)[n];  int64 n; float32 x[n]; float64 log(x)[n]
 * Every output is checked (|got - want| <= atol + rtol |want|; the polynomials within 4 ulp); the exit status is
 * 0 when all pass, 1 otherwise, with one line per quantity. REPEAT > 1 runs each kernel call that many times
 * and prints the fastest (for profiling; the last results are checked).
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include "teskd_loss_cpu.c"

#include <stdio.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}

static FILE* in;

/* The kernel's entry points through volatile pointers: never inlined into this file, so that the code run (and
 * profiled) is the same out-of-line code as in the shared library. */
static int64_t (*volatile rows_f32)(const teskd_options*, const float*, const float* const*, const int64_t*,
                                    const double*, const float*, const float* const*, float*, float*, double*, float*,
                                    float*) = teskd_rows_f32;
static void (*volatile feature_grad_f32)(const teskd_options*, const float*, const float* const*, float*,
                                         double) = teskd_feature_grad_f32;

static void read_exact(void* dst, size_t size, size_t n) {
    if (fread(dst, size, n, in) != n) {
        fprintf(stderr, "driver: truncated input\n");
        exit(2);
    }
}

static void* read_array(size_t size, size_t n) {
    void* p = malloc(size * (n ? n : 1));
    if (p == NULL) {
        fprintf(stderr, "driver: out of memory\n");
        exit(2);
    }
    read_exact(p, size, n);
    return p;
}

/* Compares n float results with float64 expectations; prints the largest error and the element nearest to its
 * bound (err / (atol + rtol |want|), 1 at the bound; a non-finite error counts as over it). Returns 1 on a
 * failure. */
static int check(const char* what, int case_index, const float* got, const double* want, int64_t n, double atol,
                 double rtol) {
    double max_err = 0.0, worst = 0.0;
    int64_t at = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double err = fabs((double)got[i] - want[i]);
        const double ratio = isfinite(err) ? err / (atol + rtol * fabs(want[i])) : INFINITY;
        if (err > max_err) max_err = err;
        if (!(ratio <= worst)) worst = ratio, at = i;
    }
    const int fail = !(worst <= 1.0);
    printf("case %d %-13s n=%-7lld max |err| %.3e, worst %.3f of its bound at %lld (got %.9g, want %.9g)%s\n",
           case_index, what, (long long)n, max_err, worst, (long long)at, n ? (double)got[at] : 0.0,
           n ? want[at] : 0.0, fail ? "  FAIL" : "");
    return fail;
}

static int check_ulps(const char* what, void (*fn)(const float*, float*, int64_t), int repeat) {
    int64_t n;
    read_exact(&n, sizeof n, 1);
    float* x = read_array(sizeof(float), (size_t)n);
    double* want = read_array(sizeof(double), (size_t)n);
    float* got = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int r = 0; r < repeat; ++r) fn(x, got, n);
    double worst = 0.0;
    int64_t at = 0;
    for (int64_t i = 0; i < n; ++i) {
        double ulps;
        if (want[i] == 0.0 || isinf(want[i]) || isnan(want[i]))  /* exact, or the same special value */
            ulps = ((double)got[i] == want[i] || (isnan(want[i]) && isnan(got[i]))) ? 0.0 : INFINITY;
        else
            ulps = fabs((double)got[i] - want[i]) / fabs(want[i]) / 0x1p-23;
        if (!(ulps <= worst)) worst = ulps, at = i;
    }
    const int fail = n > 0 && !(worst <= 4.0);
    printf("%-4s n=%-7lld max %.2f ulp at x = %.9g (got %.9g, want %.9g)%s\n", what, (long long)n, worst,
           n ? (double)x[at] : 0.0, n ? (double)got[at] : 0.0, n ? want[at] : 0.0, fail ? "  FAIL" : "");
    free(x), free(want), free(got);
    return fail;
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASES_FILE [REPEAT]\n", argv[0]);
        return 2;
    }
    const int repeat = argc > 2 ? atoi(argv[2]) : 1;
    in = fopen(argv[1], "rb");
    if (in == NULL) {
        perror(argv[1]);
        return 2;
    }
    printf("kernel built for %s\n", teskd_isa());
    int64_t ncases, failures = 0;
    read_exact(&ncases, sizeof ncases, 1);
    for (int i = 0; i < ncases; ++i) {
        int64_t size;
        teskd_options o;
        double opt[3];
        read_exact(&size, sizeof size, 1);
        if (size != (int64_t)sizeof o) {
            fprintf(stderr, "case %d: a teskd_options of %lld bytes, this build's is %zu\n", i, (long long)size, sizeof o);
            return 2;
        }
        read_exact(&o, sizeof o, 1); /* packed by the tests as the ctypes mirror of the struct */
        read_exact(opt, sizeof opt[0], 3);
        const int64_t K = o.K, B = o.B, C = o.C, D = o.D, H = K + 1;
        const double feature_scale = opt[0], atol = opt[1], rtol = opt[2];
        double* head_weights = read_array(sizeof(double), (size_t)H);
        float* teacher = read_array(sizeof(float), (size_t)(B * C));
        float* students = read_array(sizeof(float), (size_t)(K * B * C));
        float* f_t = read_array(sizeof(float), (size_t)(B * D));
        float* f_s = read_array(sizeof(float), (size_t)(K * B * D));
        int64_t* target = read_array(sizeof(int64_t), (size_t)B);
        double* want = read_array(sizeof(double), (size_t)(4 + H * B * C + K * B * D));

        const float* student_rows[64];
        const float* feature_rows[64];
        if (K > 64) return 2;
        for (int64_t k = 0; k < K; ++k) student_rows[k] = students + k * B * C, feature_rows[k] = f_s + k * B * D;
        float* grad = malloc(sizeof(float) * (size_t)(H * B * C));
        float* grad_f = malloc(sizeof(float) * (size_t)(K * B * D + 1));
        double* rows = malloc(sizeof(double) * (size_t)(3 * B));
        float parts[3], total;
        int64_t code = 0;
        /* The feature gradient both ways: written by teskd_rows in the forward pass, and by teskd_feature_grad
         * (the backward's recomputation) into grad_f2; both are checked. */
        float* grad_f2 = malloc(sizeof(float) * (size_t)(K * B * D + 1));
        double rows_us = 1e30, rows_f_us = 1e30, feature_us = 1e30; /* the fastest of the repeats */
        for (int r = 0; r < repeat; ++r) {
            const double t0 = now_us();
            code = rows_f32(&o, teacher, student_rows, target, head_weights, D ? f_t : NULL,
                                  D ? feature_rows : NULL, grad, NULL, rows, parts, &total);
            const double t1 = now_us();
            if (D) {
                code |= rows_f32(&o, teacher, student_rows, target, head_weights, f_t, feature_rows, grad,
                                       grad_f, rows, parts, &total);
            }
            const double t2 = now_us();
            if (D) feature_grad_f32(&o, f_t, feature_rows, grad_f2, feature_scale);
            const double t3 = now_us();
            rows_us = t1 - t0 < rows_us ? t1 - t0 : rows_us;
            rows_f_us = t2 - t1 < rows_f_us ? t2 - t1 : rows_f_us;
            feature_us = t3 - t2 < feature_us ? t3 - t2 : feature_us;
        }
        if (repeat > 1)
            printf("case %d timing (fastest of %d): teskd_rows %.1f us, with the feature gradient %.1f us, "
                   "teskd_feature_grad %.1f us\n", i, repeat, rows_us, rows_f_us, feature_us);
        if (code != 0) {
            printf("case %d: kernel returned %lld  FAIL\n", i, (long long)code);
            ++failures;
        } else {
            failures += check("total", i, &total, want, 1, atol, rtol);
            failures += check("parts", i, parts, want + 1, 3, atol, rtol);
            failures += check("grad logits", i, grad, want + 4, H * B * C, atol, rtol);
            failures += check("grad features", i, grad_f, want + 4 + H * B * C, K * B * D, atol, rtol);
            failures += check("grad feat (bw)", i, grad_f2, want + 4 + H * B * C, K * B * D, atol, rtol);
        }
        free(head_weights), free(teacher), free(students), free(f_t), free(f_s), free(target), free(want);
        free(grad), free(grad_f), free(grad_f2), free(rows);
    }
    failures += check_ulps("exp", teskd_exp_f32, repeat);
    failures += check_ulps("log", teskd_log_f32, repeat);
    fclose(in);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
