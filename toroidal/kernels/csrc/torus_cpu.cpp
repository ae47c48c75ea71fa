// Fused toroidal attention forward for the CPU (float32), compiled on first use by
// toroidal/kernels/native.py with -DWIDTH=<platter width, a multiple of 16>.
//
// Layout: q, k, v, out are (BH, L, WIDTH) contiguous, platter-token t = position * depth + platter;
// lse is (BH, L); keep is (B, L) bytes (1 = real key) or null. The bias is the one definition,
// -lambda * (ring(i, j) / P + |k - l| / D), computed per score: with P >= N (checked by the caller)
// |i - j| < P, so ring = min(|i - j|, P - |i - j|) needs no modulo. Masks: causal at position level
// (j <= i: every platter of the query's own position is visible), the circular window, padding.
//
// One task is a block of QB query rows against key blocks of KB keys (flash attention's online
// softmax); `threads` workers (plain threads, joined before returning: an OpenMP pool would
// hang a process forked after it ran) take tasks from a shared counter, longest rows first. Inside, R rows at a time: scores for 16 keys per vector (K transposed per key block),
// one exp pass, then P.V with each value row loaded once for the R rows. GCC vector extensions
// compile to AVX-512, AVX2 or NEON by -march=native.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <thread>
#include <vector>

#ifndef WIDTH
#define WIDTH 16
#endif
#define LANES 16
#define NV (WIDTH / LANES)
#define QB 64
#define KB 256
// Rows per pass: enough to reuse each loaded key and value vector, few enough to stay in registers.
#define R (WIDTH <= 16 ? 8 : (WIDTH <= 32 ? 4 : (WIDTH <= 64 ? 2 : 1)))

static_assert(LANES == 16 && WIDTH % LANES == 0, "WIDTH must be a multiple of 16");

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

// Spelled out: `vec{} + x` would add 0.0 (not an identity for -0.0), one more instruction per use.
static inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline vec vmin(vec a, vec b) { return a < b ? a : b; }
static inline vec vabs(vec a) { return a < 0 ? -a : a; }
static inline vec load(const float* p) { vec x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float* p, vec x) { memcpy(p, &x, sizeof x); }

static inline float hmax(vec a) {
    float m = a[0];
    for (int i = 1; i < LANES; i++) m = a[i] > m ? a[i] : m;
    return m;
}

static inline float hsum(vec a) {
    float s = 0.f;
    for (int i = 0; i < LANES; i++) s += a[i];
    return s;
}

// exp(x) for x <= 0 (scores minus their running max): 2^n * e^r with |r| <= ln(2)/2, a degree-6
// Taylor polynomial for e^r (relative error ~2e-7), 2^n from the exponent bits. Below -87 the
// result is clamped near FLT_MIN; masked scores are zeroed by the caller.
static inline vec exp_nonpositive(vec x) {
    x = vmax(x, splat(-87.0f));
    vec n = x * splat(1.44269504088896341f) + splat(0.5f);
    vec whole = __builtin_convertvector(__builtin_convertvector(n, ivec), vec);  // rounds toward 0
    whole = whole > n ? whole - splat(1.0f) : whole;                           // floor
    vec r = x - whole * splat(0.693145751953125f) - whole * splat(1.428606765330187045e-06f);
    vec p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    ivec bits = (__builtin_convertvector(whole, ivec) + 127) << 23;
    vec two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

struct Geometry {
    int64_t length, depth, heads;  // heads per batch entry: row h of BH belongs to batch h / heads
    float period, lam_p, lam_d, window, scale;  // window < 0: none
    int causal;
};

// Per key block: K transposed (WIDTH x KB), each key's position and platter; keys past the end
// of the sequence or padded get position +inf, which every mask below rejects.
static void load_keys(const float* kh, const uint8_t* keep, const Geometry& g, int64_t t0, int64_t nt,
                      float* kt, float* pos, float* platter) {
    int64_t padded = (nt + LANES - 1) / LANES * LANES;
    for (int64_t t = 0; t < padded; t++) {
        int real = t < nt && (keep == nullptr || keep[t0 + t]);
        for (int d = 0; d < WIDTH; d++) kt[d * KB + t] = t < nt ? kh[(t0 + t) * WIDTH + d] : 0.f;
        pos[t] = real ? (float)((t0 + t) / g.depth) : INFINITY;
        platter[t] = (float)((t0 + t) % g.depth);
    }
}

// Scores of R query rows against the key block, biased and masked, into s (R x KB); returns maxima.
// Everything read in the loop is copied to locals first: stores to s could otherwise alias it.
static inline void score_rows(const float (*__restrict__ qs)[WIDTH], const float* __restrict__ row_pos,
                              const float* __restrict__ row_platter, const float* __restrict__ kt,
                              const float* __restrict__ pos, const float* __restrict__ platter,
                              int64_t padded, const Geometry& g, float* __restrict__ s,
                              float* __restrict__ row_max) {
    const vec period = splat(g.period), lam_p = splat(g.lam_p), lam_d = splat(g.lam_d);
    const vec window = splat(g.window), rejected_pos = splat(INFINITY), minus_inf = splat(-INFINITY);
    const bool causal = g.causal, windowed = g.window >= 0;
    // Row positions stay scalars (broadcast per use): R more vectors would spill registers.
    float fi[R], fk[R];
    vec best[R];
    for (int a = 0; a < R; a++) {
        fi[a] = row_pos[a];
        fk[a] = row_platter[a];
        best[a] = minus_inf;
    }
    for (int64_t t = 0; t < padded; t += LANES) {
        vec acc[R];
        for (int a = 0; a < R; a++) acc[a] = splat(0.f);
        for (int d = 0; d < WIDTH; d++) {
            vec kd = load(kt + d * KB + t);
            for (int a = 0; a < R; a++) acc[a] += splat(qs[a][d]) * kd;
        }
        vec j = load(pos + t), l = load(platter + t);
        for (int a = 0; a < R; a++) {
            vec dist = vabs(splat(fi[a]) - j);  // inf for rejected keys
            vec ring = vmin(dist, period - dist);
            vec val = acc[a] - lam_p * ring - lam_d * vabs(splat(fk[a]) - l);
            auto rejected = j == rejected_pos;
            if (causal) rejected = rejected | (j > splat(fi[a]));
            if (windowed) rejected = rejected | (ring > window);
            val = rejected ? minus_inf : val;
            store(s + a * KB + t, val);
            best[a] = vmax(best[a], val);
        }
    }
    for (int a = 0; a < R; a++) row_max[a] = hmax(best[a]);
}

extern "C" void torus_forward(const float* q, const float* k, const float* v, const uint8_t* keep,
                              float* out, float* lse, int64_t bh, int64_t length, int64_t depth,
                              int64_t heads, int64_t period, float lam, int causal, int64_t window,
                              float scale, int threads) {
    Geometry g = {length, depth, heads, (float)period, lam / (float)period, lam / (float)depth,
                  window < 0 ? -1.f : (float)window, scale, causal};
    const int64_t n_blocks = (length + QB - 1) / QB;
    std::atomic<int64_t> next_task{0};
    auto worker = [&]() {
        float* kt = (float*)aligned_alloc(64, sizeof(float) * WIDTH * KB);
        float* s = (float*)aligned_alloc(64, sizeof(float) * R * KB);
        float* pos = (float*)aligned_alloc(64, sizeof(float) * KB);
        float* platter = (float*)aligned_alloc(64, sizeof(float) * KB);
        vec acc[QB][NV];
        float run_max[QB], run_sum[QB];
        for (int64_t task = next_task++; task < bh * n_blocks; task = next_task++) {
            int64_t h = task / n_blocks, block = n_blocks - 1 - task % n_blocks;  // long rows first
            const float* qh = q + h * length * WIDTH;
            const float* kh = k + h * length * WIDTH;
            const float* vh = v + h * length * WIDTH;
            const uint8_t* keep_b = keep ? keep + (h / heads) * length : nullptr;
            int64_t r0 = block * QB, r1 = r0 + QB < length ? r0 + QB : length, rows = r1 - r0;
            // Causal: no key past the last query row's position.
            int64_t last = ((r1 - 1) / depth + 1) * depth;
            int64_t t_end = causal && last < length ? last : length;
            for (int64_t r = 0; r < rows; r++) {
                run_max[r] = -INFINITY;
                run_sum[r] = 0.f;
                for (int c = 0; c < NV; c++) acc[r][c] = splat(0.f);
            }
            for (int64_t t0 = 0; t0 < t_end; t0 += KB) {
                int64_t nt = t_end - t0 < KB ? t_end - t0 : KB;
                int64_t padded = (nt + LANES - 1) / LANES * LANES;
                load_keys(kh, keep_b, g, t0, nt, kt, pos, platter);
                for (int64_t r = 0; r < rows; r += R) {
                    float qs[R][WIDTH] __attribute__((aligned(64)));
                    float fi[R], fk[R], row_max[R], corr[R];
                    for (int a = 0; a < R; a++) {
                        int64_t row = r0 + (r + a < rows ? r + a : rows - 1);  // spare lanes repeat a row
                        for (int d = 0; d < WIDTH; d++) qs[a][d] = qh[row * WIDTH + d] * scale;
                        fi[a] = (float)(row / depth);
                        fk[a] = (float)(row % depth);
                    }
                    score_rows(qs, fi, fk, kt, pos, platter, padded, g, s, row_max);
                    for (int a = 0; a < R; a++) {
                        int64_t ra = r + a < rows ? r + a : rows - 1;
                        float top = row_max[a] > run_max[ra] ? row_max[a] : run_max[ra];
                        vec shift = splat(top == -INFINITY ? 0.f : top);
                        vec total = splat(0.f);
                        for (int64_t t = 0; t < padded; t += LANES) {
                            vec x = load(s + a * KB + t);
                            vec p = exp_nonpositive(x - shift);
                            p = x == splat(-INFINITY) ? splat(0.f) : p;
                            store(s + a * KB + t, p);
                            total += p;
                        }
                        corr[a] = run_max[ra] == -INFINITY ? 0.f : expf(run_max[ra] - top);
                        if (r + a < rows) {
                            run_sum[ra] = run_sum[ra] * corr[a] + hsum(total);
                            run_max[ra] = top;
                        }
                    }
                    vec o[R][NV];
                    for (int a = 0; a < R; a++)
                        for (int c = 0; c < NV; c++) o[a][c] = splat(0.f);
                    for (int64_t t = 0; t < nt; t++) {
                        vec vt[NV];
                        for (int c = 0; c < NV; c++) vt[c] = load(vh + (t0 + t) * WIDTH + c * LANES);
                        for (int a = 0; a < R; a++) {
                            vec p = splat(s[a * KB + t]);
                            for (int c = 0; c < NV; c++) o[a][c] += p * vt[c];
                        }
                    }
                    for (int a = 0; a < R && r + a < rows; a++)
                        for (int c = 0; c < NV; c++) acc[r + a][c] = acc[r + a][c] * splat(corr[a]) + o[a][c];
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                float inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;  // rows with no key: zeros
                for (int c = 0; c < NV; c++) store(out + (h * length + r0 + r) * WIDTH + c * LANES, acc[r][c] * splat(inv));
                lse[h * length + r0 + r] = run_sum[r] > 0.f ? run_max[r] + logf(run_sum[r]) : -INFINITY;
            }
        }
        free(kt);
        free(s);
        free(pos);
        free(platter);
    };
    std::vector<std::thread> helpers;
    for (int i = 1; i < threads; i++) helpers.emplace_back(worker);
    worker();
    for (auto& helper : helpers) helper.join();
}
