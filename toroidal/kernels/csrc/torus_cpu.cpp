// Fused toroidal attention for the CPU: forward and backward, compiled on first use by
// toroidal/kernels/native.py with -DWIDTH=<platter width, a multiple of 16>, in float32, or with
// -DTOROIDAL_DOUBLE in float64 (every value, softmax statistics included, a `scalar`).
//
// Layout: q, dq are (BH, Lq, WIDTH), k, v, dk, dv (BH, Lk, WIDTH), all contiguous; platter-token
// t = position * depth + platter, and query row r sits at position q_offset + r / depth (q_offset
// > 0 when decoding with a KV cache). lse is (BH, Lq); keep is (B, Lk) bytes (1 = real key) or
// null. The bias is the one definition, -lambda * (ring(i, j) / P + |k - l| / D), computed per
// score: ring = min(m, P - m) with m = |i - j| mod P (the modulo only when some |i - j| can reach
// P). Masks: causal at position level (j <= i: every platter of the query's own position is
// visible), the circular window, padding. Whole blocks outside the window are skipped.
//
// Forward: a task is a block of QB query rows against key blocks of KB keys (flash attention's
// online softmax). Backward: a task is one head's share of its key blocks, which owns their dk and
// dv; its dq goes to its own slice of dq_parts, summed by the caller. Workers are plain threads
// started per call (an OpenMP pool would hang a process forked after it ran), taking tasks from a
// shared counter (see run_tasks). Inside, R rows at a time: scores for 16 keys per vector (K transposed per
// key block), then products with each key or value row loaded once for the R rows. GCC vector
// extensions compile to AVX-512, AVX2 or NEON by -march=native.

#include <math.h>
#include <cmath>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

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

#ifdef TOROIDAL_DOUBLE
typedef double scalar;
typedef int64_t lane_int;  // as wide as the scalar: exponent bits and conversions
#else
typedef float scalar;
typedef int32_t lane_int;
#endif
typedef scalar vec __attribute__((vector_size(LANES * sizeof(scalar))));
typedef lane_int ivec __attribute__((vector_size(LANES * sizeof(lane_int))));

// Spelled out: `vec{} + x` would add 0.0 (not an identity for -0.0), one more instruction per use.
static inline vec splat(scalar x) { return vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vec vmax(vec a, vec b) { return a > b ? a : b; }
static inline vec vmin(vec a, vec b) { return a < b ? a : b; }
static inline vec vabs(vec a) { return a < 0 ? -a : a; }
static inline vec load(const scalar* p) { vec x; memcpy(&x, p, sizeof x); return x; }
static inline void store(scalar* p, vec x) { memcpy(p, &x, sizeof x); }
static inline vec truncated(vec x) { return __builtin_convertvector(__builtin_convertvector(x, ivec), vec); }

static inline scalar hmax(vec a) {
    scalar m = a[0];
    for (int i = 1; i < LANES; i++) m = a[i] > m ? a[i] : m;
    return m;
}

static inline scalar hsum(vec a) {
    scalar s = 0.f;
    for (int i = 0; i < LANES; i++) s += a[i];
    return s;
}

// exp(x) for x <= 0 (scores minus their running max or log-sum-exp): 2^n * e^r with
// |r| <= ln(2)/2, a Taylor polynomial for e^r (float: degree 6, relative error ~2e-7; double:
// degree 13, ~1e-16), 2^n from the exponent bits. Below -87 (double: -708) the result is clamped
// near the smallest normal number; masked scores are zeroed by the caller.
#ifdef TOROIDAL_DOUBLE
static inline vec exp_nonpositive(vec x) {
    x = vmax(x, splat(-708.0));
    vec n = x * splat(1.4426950408889634074) + splat(0.5);
    vec whole = truncated(n);                        // rounds toward 0
    whole = whole > n ? whole - splat(1.0) : whole;  // floor
    vec r = x - whole * splat(6.93147180369123816490e-01) - whole * splat(1.90821492927058770002e-10);
    vec p = splat(1.0 / 6227020800.0);  // 1/13!
    static const double inverse_factorials[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                                1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                                                1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                                                1.0 / 6.0,         0.5,              1.0,
                                                1.0};
    for (double c : inverse_factorials) p = p * r + splat(c);
    ivec bits = (__builtin_convertvector(whole, ivec) + 1023) << 52;
    vec two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}
#else
static inline vec exp_nonpositive(vec x) {
    x = vmax(x, splat(-87.0f));
    vec n = x * splat(1.44269504088896341f) + splat(0.5f);
    vec whole = truncated(n);                            // rounds toward 0
    whole = whole > n ? whole - splat(1.0f) : whole;    // floor
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
#endif

struct Geometry {
    int64_t lq, lk, depth, heads, q_offset;  // heads per batch entry: row h of BH is batch h / heads
    scalar period, lam_p, lam_d, window, scale;  // window < 0: none
    int causal;
};

// The geometry as vectors, for the score loops.
struct Rules {
    vec period, lam_p, lam_d, window, rejected_pos, minus_inf;
    bool causal, windowed;
    explicit Rules(const Geometry& g)
        : period(splat(g.period)), lam_p(splat(g.lam_p)), lam_d(splat(g.lam_d)), window(splat(g.window)),
          rejected_pos(splat(INFINITY)), minus_inf(splat(-INFINITY)), causal(g.causal), windowed(g.window >= 0) {}
};

// Biased score of one query row (position fi, platter fk) against 16 keys (positions j, platters l),
// or -inf where a rule rejects the key. Rejected keys carry position +inf.
template <bool WRAP>
static inline vec biased(vec dot, scalar fi, scalar fk, vec j, vec l, const Rules& c) {
    auto missing = j == c.rejected_pos;
    vec m = vabs(splat(fi) - j);
    if (WRAP) {  // |i - j| can reach P: reduce it (missing keys get 0 so the conversion stays in range)
        m = missing ? splat(0.f) : m;
        m = m - truncated(m / c.period) * c.period;
        m = m < 0 ? m + c.period : m;
        m = m >= c.period ? m - c.period : m;
    }
    vec ring = vmin(m, c.period - m);
    vec val = dot - c.lam_p * ring - c.lam_d * vabs(splat(fk) - l);
    auto rejected = missing;
    if (c.causal) rejected = rejected | (j > splat(fi));
    if (c.windowed) rejected = rejected | (ring > c.window);
    return rejected ? c.minus_inf : val;
}

// Can any query at positions [q0, q1] see any key at positions [k0, k1]? False only when certain.
static bool visible(const Geometry& g, scalar q0, scalar q1, scalar k0, scalar k1) {
    if (g.causal && k0 > q1) return false;
    if (g.window < 0) return true;
    // Distances |i - j| between the ranges (i >= j only, under the causal rule).
    scalar lo = g.causal ? std::fmax(0.f, q0 - k1) : std::fmax(0.f, std::fmax(k0 - q1, q0 - k1));
    scalar hi = g.causal ? q1 - k0 : std::fmax(q1 - k0, k1 - q0);
    if (hi >= g.period) return true;  // they wrap: no cheap bound
    return std::fmin(lo, g.period - hi) <= g.window;
}

static inline scalar query_pos(const Geometry& g, int64_t row) { return (scalar)(g.q_offset + row / g.depth); }

// Per key block: K transposed (WIDTH x KB), each key's position and platter; keys past the block's
// end or padded get position +inf, which every rule rejects. With vt, V transposed as well.
static void load_keys(const scalar* kh, const scalar* vh, const uint8_t* keep, const Geometry& g, int64_t t0,
                      int64_t nt, scalar* kt, scalar* vt, scalar* pos, scalar* platter) {
    int64_t padded = (nt + LANES - 1) / LANES * LANES;
    for (int64_t t = 0; t < padded; t++) {
        int real = t < nt && (keep == nullptr || keep[t0 + t]);
        for (int d = 0; d < WIDTH; d++) kt[d * KB + t] = t < nt ? kh[(t0 + t) * WIDTH + d] : 0.f;
        if (vt)
            for (int d = 0; d < WIDTH; d++) vt[d * KB + t] = t < nt ? vh[(t0 + t) * WIDTH + d] : 0.f;
        pos[t] = real ? (scalar)((t0 + t) / g.depth) : INFINITY;
        platter[t] = (scalar)((t0 + t) % g.depth);
    }
}

// R query rows starting at r (spare rows repeat the last real one): scaled q, positions, platters.
static int load_rows(const scalar* qh, const Geometry& g, int64_t r, int64_t r_end, scalar (*qs)[WIDTH],
                     scalar* fi, scalar* fk, int64_t* row) {
    for (int a = 0; a < R; a++) {
        row[a] = r + a < r_end ? r + a : r_end - 1;
        for (int d = 0; d < WIDTH; d++) qs[a][d] = qh[row[a] * WIDTH + d] * g.scale;
        fi[a] = query_pos(g, row[a]);
        fk[a] = (scalar)(row[a] % g.depth);
    }
    return r_end - r < R ? (int)(r_end - r) : R;
}

// Scores of R rows against the key block, biased and masked, into s (R x KB); returns maxima.
template <bool WRAP>
static inline void score_rows(const scalar (*__restrict__ qs)[WIDTH], const scalar* fi, const scalar* fk,
                              const scalar* __restrict__ kt, const scalar* __restrict__ pos,
                              const scalar* __restrict__ platter, int64_t padded, const Rules& c,
                              scalar* __restrict__ s, scalar* __restrict__ row_max) {
    vec best[R];
    for (int a = 0; a < R; a++) best[a] = c.minus_inf;
    for (int64_t t = 0; t < padded; t += LANES) {
        vec acc[R];
        for (int a = 0; a < R; a++) acc[a] = splat(0.f);
        for (int d = 0; d < WIDTH; d++) {
            vec kd = load(kt + d * KB + t);
            for (int a = 0; a < R; a++) acc[a] += splat(qs[a][d]) * kd;
        }
        vec j = load(pos + t), l = load(platter + t);
        for (int a = 0; a < R; a++) {
            vec val = biased<WRAP>(acc[a], fi[a], fk[a], j, l, c);
            store(s + a * KB + t, val);
            best[a] = vmax(best[a], val);
        }
    }
    for (int a = 0; a < R; a++) row_max[a] = hmax(best[a]);
}

// o[a] += sum over the block's nt keys of w[a][t] * x[t] (x: the block's rows of v or k).
static inline void weighted_rows(const scalar* __restrict__ w, const scalar* __restrict__ x, int64_t nt,
                                 vec (*o)[NV]) {
    for (int64_t t = 0; t < nt; t++) {
        vec xt[NV];
        for (int c = 0; c < NV; c++) xt[c] = load(x + t * WIDTH + c * LANES);
        for (int a = 0; a < R; a++) {
            vec p = splat(w[a * KB + t]);
            for (int c = 0; c < NV; c++) o[a][c] += p * xt[c];
        }
    }
}

// Runs task(0 .. n_tasks - 1) on this thread and up to threads - 1 helpers, returning when every
// task has run. Helpers are detached and never waited for: one that starts late (its core busy,
// e.g. with PyTorch's OpenMP workers still spinning after their last op) finds no task left and
// exits, touching only the shared state it co-owns, instead of holding up the call.
struct TaskQueue {
    std::atomic<int64_t> next{0};
    int64_t n_tasks, done = 0;
    std::function<void(int64_t)> task;
    std::mutex lock;
    std::condition_variable finished;

    void work() {
        for (int64_t i = next++; i < n_tasks; i = next++) {
            task(i);
            std::lock_guard<std::mutex> hold(lock);
            if (++done == n_tasks) finished.notify_all();
        }
    }
};

static void run_tasks(int64_t n_tasks, int threads, std::function<void(int64_t)> task) {
    auto queue = std::make_shared<TaskQueue>();
    queue->n_tasks = n_tasks;
    queue->task = std::move(task);
    for (int i = 1; i < threads && i < n_tasks; i++) std::thread([queue] { queue->work(); }).detach();
    queue->work();
    std::unique_lock<std::mutex> hold(queue->lock);
    queue->finished.wait(hold, [&] { return queue->done == n_tasks; });
}

// One task's buffers, 64-byte aligned: transposed keys and values, scores, key positions and
// platters, and (backward) the key block's dk and dv, transposed.
struct Scratch {
    scalar *kt, *vt, *s, *ds, *pos, *platter, *dkt, *dvt;
    Scratch() {
        kt = alloc(WIDTH * KB), vt = alloc(WIDTH * KB), s = alloc(R * KB), ds = alloc(R * KB);
        pos = alloc(KB), platter = alloc(KB), dkt = alloc(WIDTH * KB), dvt = alloc(WIDTH * KB);
    }
    ~Scratch() {
        for (scalar* p : {kt, vt, s, ds, pos, platter, dkt, dvt}) free(p);
    }
    static scalar* alloc(int64_t n) { return (scalar*)aligned_alloc(64, sizeof(scalar) * n); }
};

// The last key (exclusive) any of rows [r0, r1) may see under the causal rule.
static int64_t causal_end(const Geometry& g, int64_t r1) {
    int64_t last = ((int64_t)query_pos(g, r1 - 1) + 1) * g.depth;
    return g.causal && last < g.lk ? last : g.lk;
}

template <bool WRAP>
static void forward(const scalar* q, const scalar* k, const scalar* v, const uint8_t* keep, scalar* out, scalar* lse,
                    int64_t bh, const Geometry& g, int threads) {
    const Rules c(g);
    const int64_t n_blocks = (g.lq + QB - 1) / QB;
    run_tasks(bh * n_blocks, threads, [&](int64_t task) {
        Scratch scratch;
        int64_t h = task / n_blocks, block = n_blocks - 1 - task % n_blocks;  // long rows first
        const scalar* qh = q + h * g.lq * WIDTH;
        const scalar* kh = k + h * g.lk * WIDTH;
        const scalar* vh = v + h * g.lk * WIDTH;
        const uint8_t* keep_b = keep ? keep + (h / g.heads) * g.lk : nullptr;
        int64_t r0 = block * QB, r1 = r0 + QB < g.lq ? r0 + QB : g.lq, rows = r1 - r0;
        int64_t t_end = causal_end(g, r1);
        vec acc[QB][NV];
        scalar run_max[QB], run_sum[QB];
        for (int64_t r = 0; r < rows; r++) {
            run_max[r] = -INFINITY;
            run_sum[r] = 0.f;
            for (int x = 0; x < NV; x++) acc[r][x] = splat(0.f);
        }
        scalar* s = scratch.s;
        for (int64_t t0 = 0; t0 < t_end; t0 += KB) {
            int64_t nt = t_end - t0 < KB ? t_end - t0 : KB;
            int64_t padded = (nt + LANES - 1) / LANES * LANES;
            scalar k0 = (scalar)(t0 / g.depth), k1 = (scalar)((t0 + nt - 1) / g.depth);
            if (!visible(g, query_pos(g, r0), query_pos(g, r1 - 1), k0, k1)) continue;
            load_keys(kh, nullptr, keep_b, g, t0, nt, scratch.kt, nullptr, scratch.pos, scratch.platter);
            for (int64_t r = 0; r < rows; r += R) {
                scalar qs[R][WIDTH] __attribute__((aligned(64)));
                scalar fi[R], fk[R], row_max[R], corr[R];
                int64_t row[R];
                int live = load_rows(qh, g, r0 + r, r1, qs, fi, fk, row);
                score_rows<WRAP>(qs, fi, fk, scratch.kt, scratch.pos, scratch.platter, padded, c, s, row_max);
                for (int a = 0; a < R; a++) {
                    int64_t ra = row[a] - r0;
                    scalar top = row_max[a] > run_max[ra] ? row_max[a] : run_max[ra];
                    vec shift = splat(top == -INFINITY ? 0.f : top);
                    vec total = splat(0.f);
                    for (int64_t t = 0; t < padded; t += LANES) {
                        vec x = load(s + a * KB + t);
                        vec p = exp_nonpositive(x - shift);
                        p = x == c.minus_inf ? splat(0.f) : p;
                        store(s + a * KB + t, p);
                        total += p;
                    }
                    corr[a] = run_max[ra] == -INFINITY ? 0.f : std::exp(run_max[ra] - top);
                    if (a < live) {
                        run_sum[ra] = run_sum[ra] * corr[a] + hsum(total);
                        run_max[ra] = top;
                    }
                }
                vec o[R][NV];
                for (int a = 0; a < R; a++)
                    for (int x = 0; x < NV; x++) o[a][x] = splat(0.f);
                weighted_rows(s, vh + t0 * WIDTH, nt, o);
                for (int a = 0; a < live; a++)
                    for (int x = 0; x < NV; x++) acc[r + a][x] = acc[r + a][x] * splat(corr[a]) + o[a][x];
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            scalar inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;  // rows with no key: zeros
            for (int x = 0; x < NV; x++) store(out + (h * g.lq + r0 + r) * WIDTH + x * LANES, acc[r][x] * splat(inv));
            lse[h * g.lq + r0 + r] = run_sum[r] > 0.f ? run_max[r] + std::log(run_sum[r]) : -INFINITY;
        }
    });
}

// Flash attention's backward for one key block against rows [r0, r1): p = exp(s - lse),
// dp = do . v, ds = p (dp - delta); dv += p^T do, dk += ds^T (scale q), dq += scale ds k.
template <bool WRAP>
static void backward_block(const scalar* qh, const scalar* kh, const scalar* doh, const scalar* lse_h,
                           const scalar* delta_h, scalar* dqh, int64_t t0, int64_t nt, int64_t r0, int64_t r1,
                           const Geometry& g, const Rules& c, Scratch& sc) {
    scalar *dkt = sc.dkt, *dvt = sc.dvt;
    int64_t padded = (nt + LANES - 1) / LANES * LANES;
    scalar k0 = (scalar)(t0 / g.depth), k1 = (scalar)((t0 + nt - 1) / g.depth);
    for (int64_t b0 = r0; b0 < r1; b0 += QB) {
        int64_t b1 = b0 + QB < r1 ? b0 + QB : r1;
        if (!visible(g, query_pos(g, b0), query_pos(g, b1 - 1), k0, k1)) continue;
        for (int64_t r = b0; r < b1; r += R) {
            scalar qs[R][WIDTH] __attribute__((aligned(64)));
            scalar dos[R][WIDTH] __attribute__((aligned(64)));
            scalar fi[R], fk[R], row_lse[R], row_delta[R];
            int64_t row[R];
            int live = load_rows(qh, g, r, b1, qs, fi, fk, row);
            for (int a = 0; a < R; a++) {
                for (int d = 0; d < WIDTH; d++) dos[a][d] = doh[row[a] * WIDTH + d];
                row_lse[a] = lse_h[row[a]];
                row_delta[a] = delta_h[row[a]];
            }
            for (int64_t t = 0; t < padded; t += LANES) {
                vec dot[R], dp[R];
                for (int a = 0; a < R; a++) dot[a] = dp[a] = splat(0.f);
                for (int d = 0; d < WIDTH; d++) {
                    vec kd = load(sc.kt + d * KB + t), vd = load(sc.vt + d * KB + t);
                    for (int a = 0; a < R; a++) {
                        dot[a] += splat(qs[a][d]) * kd;
                        dp[a] += splat(dos[a][d]) * vd;
                    }
                }
                vec j = load(sc.pos + t), l = load(sc.platter + t);
                vec p[R], ds[R];
                for (int a = 0; a < R; a++) {
                    vec val = biased<WRAP>(dot[a], fi[a], fk[a], j, l, c);
                    // A row with nothing to see has lse = -inf and only -inf scores: p = 0.
                    p[a] = a < live ? exp_nonpositive(val - splat(row_lse[a])) : splat(0.f);
                    p[a] = val == c.minus_inf ? splat(0.f) : p[a];
                    ds[a] = p[a] * (dp[a] - splat(row_delta[a]));
                    store(sc.ds + a * KB + t, ds[a]);
                }
                for (int d = 0; d < WIDTH; d++) {
                    vec gv = load(dvt + d * KB + t), gk = load(dkt + d * KB + t);
                    for (int a = 0; a < R; a++) {
                        gv += p[a] * splat(dos[a][d]);
                        gk += ds[a] * splat(qs[a][d]);
                    }
                    store(dvt + d * KB + t, gv);
                    store(dkt + d * KB + t, gk);
                }
            }
            vec o[R][NV];
            for (int a = 0; a < R; a++)
                for (int x = 0; x < NV; x++) o[a][x] = splat(0.f);
            weighted_rows(sc.ds, kh + t0 * WIDTH, nt, o);
            for (int a = 0; a < live; a++)
                for (int x = 0; x < NV; x++) {
                    scalar* dst = dqh + row[a] * WIDTH + x * LANES;
                    store(dst, load(dst) + o[a][x] * splat(g.scale));
                }
        }
    }
}

template <bool WRAP>
static void backward(const scalar* q, const scalar* k, const scalar* v, const uint8_t* keep, const scalar* dout,
                     const scalar* lse, const scalar* delta, scalar* dq_parts, scalar* dk, scalar* dv, int64_t bh,
                     int64_t chunks, const Geometry& g, int threads) {
    const Rules c(g);
    const int64_t n_kblocks = (g.lk + KB - 1) / KB;
    run_tasks(bh * chunks, threads, [&](int64_t task) {
        Scratch scratch;
        scalar *dkt = scratch.dkt, *dvt = scratch.dvt;
        int64_t h = task / chunks, chunk = task % chunks;
        const scalar* kh = k + h * g.lk * WIDTH;
        scalar* dqh = dq_parts + (h * chunks + chunk) * g.lq * WIDTH;
        const uint8_t* keep_b = keep ? keep + (h / g.heads) * g.lk : nullptr;
        for (int64_t kb = chunk; kb < n_kblocks; kb += chunks) {  // interleaved: causal work evens out
            int64_t t0 = kb * KB, nt = g.lk - t0 < KB ? g.lk - t0 : KB;
            load_keys(kh, v + h * g.lk * WIDTH, keep_b, g, t0, nt, scratch.kt, scratch.vt, scratch.pos,
                      scratch.platter);
            memset(dkt, 0, sizeof(scalar) * WIDTH * KB);
            memset(dvt, 0, sizeof(scalar) * WIDTH * KB);
            // Causal: rows at positions before the block's first key see none of it.
            int64_t first = (t0 / g.depth - g.q_offset) * g.depth;
            int64_t r0 = g.causal && first > 0 ? first : 0;
            if (r0 < g.lq)
                backward_block<WRAP>(q + h * g.lq * WIDTH, kh, dout + h * g.lq * WIDTH, lse + h * g.lq,
                                     delta + h * g.lq, dqh, t0, nt, r0, g.lq, g, c, scratch);
            for (int64_t t = 0; t < nt; t++)
                for (int d = 0; d < WIDTH; d++) {
                    dk[(h * g.lk + t0 + t) * WIDTH + d] = dkt[d * KB + t];
                    dv[(h * g.lk + t0 + t) * WIDTH + d] = dvt[d * KB + t];
                }
        }
    });
}

static Geometry geometry(int64_t lq, int64_t lk, int64_t depth, int64_t heads, int64_t q_offset, int64_t period,
                         scalar lam, int causal, int64_t window, scalar scale) {
    return Geometry{lq, lk, depth, heads, q_offset, (scalar)period, lam / (scalar)period, lam / (scalar)depth,
                    window < 0 ? -1.f : (scalar)window, scale, causal};
}

// Does some |i - j| reach the period? Query positions run to q_offset + lq/depth - 1, keys from 0.
static bool wraps(const Geometry& g) {
    int64_t reach = g.q_offset + (g.lq + g.depth - 1) / g.depth - 1;
    int64_t key_reach = (g.lk + g.depth - 1) / g.depth - 1;
    return (reach > key_reach ? reach : key_reach) >= (int64_t)g.period;
}

extern "C" void torus_forward(const scalar* q, const scalar* k, const scalar* v, const uint8_t* keep, scalar* out,
                              scalar* lse, int64_t bh, int64_t lq, int64_t lk, int64_t depth, int64_t heads,
                              int64_t q_offset, int64_t period, scalar lam, int causal, int64_t window,
                              scalar scale, int threads) {
    Geometry g = geometry(lq, lk, depth, heads, q_offset, period, lam, causal, window, scale);
    if (wraps(g))
        forward<true>(q, k, v, keep, out, lse, bh, g, threads);
    else
        forward<false>(q, k, v, keep, out, lse, bh, g, threads);
}

extern "C" void torus_backward(const scalar* q, const scalar* k, const scalar* v, const uint8_t* keep,
                               const scalar* dout, const scalar* lse, const scalar* delta, scalar* dq_parts,
                               scalar* dk, scalar* dv, int64_t chunks, int64_t bh, int64_t lq, int64_t lk,
                               int64_t depth, int64_t heads, int64_t q_offset, int64_t period, scalar lam,
                               int causal, int64_t window, scalar scale, int threads) {
    Geometry g = geometry(lq, lk, depth, heads, q_offset, period, lam, causal, window, scale);
    if (wraps(g))
        backward<true>(q, k, v, keep, dout, lse, delta, dq_parts, dk, dv, bh, chunks, g, threads);
    else
        backward<false>(q, k, v, keep, dout, lse, delta, dq_parts, dk, dv, bh, chunks, g, threads);
}
