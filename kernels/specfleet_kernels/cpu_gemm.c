/* specfleet's CPU matmul for the model runner: out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), fp32.
 *
 * W is packed once at load into panels of NB output columns, each panel [K][NB] contiguous, so a forward streams
 * every weight exactly once, sequentially, whatever the number of rows m: a decode step (m = 1), a draft tree's
 * verification (m = 5..30) and a small batch cost about the same memory traffic. MKL's small-m kernels re-read
 * the weight or run far from peak there (2-4x slower on the runner's shapes, measured in `specfleet profile`).
 *
 * Batch invariance: each output element is summed in the same order (k ascending, one fused multiply-add per
 * k, in its own vector lane) whatever m, the row's place in the batch or the thread count, so a token's logits
 * are bit-identical whether it is decoded alone, verified in a tree or batched with other requests.
 *
 * Built at first use with the host's compiler (-march=native), loaded with ctypes; see cpu_gemm.py. */
#include <stddef.h>

#if defined(__AVX512F__)
#define VW 16 /* floats per vector register */
#define NV 4  /* vectors per panel: NB = 64 columns */
#define MT 6  /* rows per tile: 24 accumulators + 4 weights + 1 broadcast of 32 registers */
#elif defined(__AVX__)
#define VW 8
#define NV 2
#define MT 4 /* 8 accumulators + 2 weights + 1 broadcast of 16 registers */
#else
#define VW 4
#define NV 2
#define MT 4
#endif
#define NB (VW * NV)

typedef float vec __attribute__((vector_size(VW * 4)));
typedef float vecu __attribute__((vector_size(VW * 4), aligned(4)));

long sf_panel_width(void) { return NB; }

/* w [n][k] row-major -> wp [ceil(n / NB)][k][NB], columns past n zero */
void sf_pack(const float *w, float *wp, long n, long k) {
  for (long p = 0; p * NB < n; p++)
    for (long kk = 0; kk < k; kk++)
      for (long j = 0; j < NB; j++) {
        long col = p * NB + j;
        wp[(p * k + kk) * NB + j] = col < n ? w[col * k + kk] : 0.f;
      }
}

static inline __attribute__((always_inline)) void tile(const float *x, const float *panel, long k, float *out,
                                                       long ldo, long nn, const float *bias, const int mt) {
  vec a[MT][NV];
  for (int i = 0; i < mt; i++)
    for (int j = 0; j < NV; j++) a[i][j] = (vec){0};
  for (long kk = 0; kk < k; kk++) {
    const vecu *p = (const vecu *)(panel + kk * NB);
    vec w[NV];
    for (int j = 0; j < NV; j++) w[j] = p[j];
    for (int i = 0; i < mt; i++) {
      float s = x[i * k + kk];
      for (int j = 0; j < NV; j++) a[i][j] += w[j] * s;
    }
  }
  for (int i = 0; i < mt; i++) {
    float row[NB];
    for (int j = 0; j < NV; j++) *(vecu *)(row + j * VW) = a[i][j];
    float *o = out + i * ldo;
    if (bias)
      for (long j = 0; j < nn; j++) o[j] = row[j] + bias[j];
    else
      for (long j = 0; j < nn; j++) o[j] = row[j];
  }
}

static void one_panel(const float *x, const float *panel, const float *bias, float *out, long m, long n, long k,
                      long p) {
  long n0 = p * NB, nn = n - n0 < NB ? n - n0 : NB;
  const float *b = bias ? bias + n0 : NULL;
  for (long m0 = 0; m0 < m; m0 += MT) {
    const float *xr = x + m0 * k;
    float *o = out + m0 * n + n0;
    switch (m - m0 < MT ? m - m0 : MT) {
    case 1: tile(xr, panel, k, o, n, nn, b, 1); break;
    case 2: tile(xr, panel, k, o, n, nn, b, 2); break;
    case 3: tile(xr, panel, k, o, n, nn, b, 3); break;
#if MT > 4
    case 4: tile(xr, panel, k, o, n, nn, b, 4); break;
    case 5: tile(xr, panel, k, o, n, nn, b, 5); break;
#endif
    default: tile(xr, panel, k, o, n, nn, b, MT); break;
    }
  }
}

/* g members: x [g][m][k] and out [g][m][n] row-major, wp [g][panels * k * NB] from sf_pack per member, bias
 * [g][n] or NULL; threads: OpenMP threads to use (1 for small products: a parallel region costs more) */
void sf_gemm(const float *x, const float *wp, const float *bias, float *out, long g, long m, long n, long k,
             int threads) {
  long panels = (n + NB - 1) / NB, jobs = g * panels;
  if (threads > jobs) threads = (int)jobs;
  if (threads < 1 || (double)g * m * n * k < 262144.0) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long job = 0; job < jobs; job++) {
    long member = job / panels, p = job % panels;
    one_panel(x + member * m * k, wp + (member * panels + p) * k * NB, bias ? bias + member * n : NULL,
              out + member * m * n, m, n, k, p);
  }
}

/* ---- one whole decoder layer (Llama / Mistral / Qwen2 / Qwen3) over P packed tokens ----------------------------
 * The runner's per-layer torch code is ~40 small ops (~5 us each on a CPU): for a forward of a few tokens that is
 * as much as the weights' reading. This does the layer in one call, in place on x [P][hidden]:
 *   h = rmsnorm(x) -> qkv (packed) -> q/k rmsnorm per head (Qwen3) -> rotary -> k, v written to the cache at
 *   (rows[p], cols[p]) -> attention of every token over its cache row's columns 0..S-1 with the additive bias
 *   (and the sliding window) -> x += o(att) -> x += down(silu(gate) * up)(rmsnorm(x)).
 * Members of a group (G models of one shape) hold P / G tokens each, member-major; their norm weights are [G][.].
 * Attention sums each (token, head) over its visible columns in column order, skipping hidden ones (weight exactly
 * 0), so a token's result does not depend on what else is in the forward either. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* sum of a[i] * b[i] in a fixed order: VW lanes over i, then the lanes pairwise, then the tail */
static inline float dot(const float *a, const float *b, long n) {
  vec acc = {0};
  long i = 0;
  for (; i + VW <= n; i += VW) acc += *(const vecu *)(a + i) * *(const vecu *)(b + i);
  float lanes[VW];
  *(vecu *)lanes = acc;
  for (int w = VW / 2; w > 0; w /= 2)
    for (int j = 0; j < w; j++) lanes[j] += lanes[j + w];
  float s = lanes[0];
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

static void rmsnorm_rows(const float *x, const float *w, float *out, long rows, long per_member, long d, float eps) {
  for (long r = 0; r < rows; r++) {
    const float *xr = x + r * d, *wr = w + (r / per_member) * d;
    float ss = dot(xr, xr, d);
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (long i = 0; i < d; i++) out[r * d + i] = wr[i] * (xr[i] * inv);
  }
}

static void rope_head(float *v, const float *c, const float *s, long d) {
  long half = d / 2;
  float tmp[1024];
  for (long i = 0; i < d; i++) tmp[i] = v[i];
  for (long i = 0; i < d; i++) {
    float rot = i < half ? -tmp[i + half] : tmp[i - half];
    v[i] = tmp[i] * c[i] + rot * s[i];
  }
}

/* Attention of one head for a run of T <= TB tokens that read the same cache row: token t's output o[t] [D] is
 * the softmax over its visible columns s in [lo[t], S) (mask[t][s] > -3e38) of q[t] . k_s * scale + mask[t][s],
 * applied to the values v_s. Every number is the one of this plain loop per token, in its order:
 *   score[s] = dot(q, k_s, D) * scale + mask[s] (one fused multiply-add), best = the largest score,
 *   for s ascending: wgt = expf(score[s] - best), total += wgt, o[i] += wgt * v_s[i] (fused), then o[i] *= 1 / total.
 * (That is what the portable build runs.) The AVX-512 build computes 16 columns' dots at once, each in its own
 * accumulators whose lanes are summed by dot()'s pairwise halving, done as a transpose of the 16 accumulators;
 * it takes the run's tokens one after the other on each block of keys and of values, so a block is read from
 * memory once for the run, and holds o in registers within a block (stored between blocks, which is exact). The
 * value of best does not depend on the order the maximum is taken in (but for the sign of a zero, which
 * x - best, and so every weight, ignores). work: TB (2 S floats + S ints); column numbers are ints (a cache row of
 * 2^31 columns would be 512 GiB a head at head_dim 64). */
#define TB 8
#if defined(__AVX512F__) && !defined(SF_PLAIN_ATTENTION) /* -DSF_PLAIN_ATTENTION: the plain loop (tests) */
#include <immintrin.h>

/* dst lane t <- lanes of a (t < 8) and b (t >= 8): each of the K = 16 / L columns held L partial sums per vector;
 * lo takes each column's first L / 2 partials, hi its last L / 2, so lo + hi is dot()'s lanes[j] += lanes[j + L/2]
 * for each column, and the result holds 2 K columns of L / 2 partials, a's columns first */
static inline __m512 halve(__m512 a, __m512 b, int L) {
  int idx_lo[16], idx_hi[16], h = L / 2;
  for (int t = 0; t < 16; t++) {
    int u = t & 7, c = u / h, j = u % h, base = (t < 8 ? 0 : 16) + c * L + j;
    idx_lo[t] = base;
    idx_hi[t] = base + h;
  }
  __m512i lo = _mm512_loadu_si512(idx_lo), hi = _mm512_loadu_si512(idx_hi);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
}

/* the 16 accumulators' lane sums, dot()'s order, as one vector: lane c = column c's sum */
static inline __m512 reduce16(__m512 *acc) {
  __m512 r8[8], r4[4], r2[2];
  for (int c = 0; c < 8; c++) r8[c] = halve(acc[2 * c], acc[2 * c + 1], 16);
  for (int c = 0; c < 4; c++) r4[c] = halve(r8[2 * c], r8[2 * c + 1], 8);
  for (int c = 0; c < 2; c++) r2[c] = halve(r4[2 * c], r4[2 * c + 1], 4);
  return halve(r2[0], r2[1], 2);
}

/* columns block[0..15]'s dots with q (block[c] = column c's key), lane c = column c, dot()'s numbers */
static inline __m512 dots16(const float *q, const float *const *kr, long D) {
  long full = D / 16 * 16;
  __m512 acc[16];
  for (int c = 0; c < 16; c++) acc[c] = _mm512_setzero_ps();
  for (int c = 0; c < 16; c++) {
    __m512 a = acc[c];
    for (long i = 0; i < full; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(kr[c] + i), a);
    acc[c] = a;
  }
  __m512 dots = reduce16(acc);
  if (full < D) {
    float d[16];
    _mm512_storeu_ps(d, dots);
    for (int c = 0; c < 16; c++) {
      float s = d[c];
      for (long i = full; i < D; i++) s += q[i] * kr[c][i];
      d[c] = s;
    }
    dots = _mm512_loadu_ps(d);
  }
  return dots;
}

/* expf of 16 floats, bit for bit what glibc's expf returns (since 2.27 glibc computes it with this algorithm, ARM's
 * optimized-routines one, and on a CPU with FMA, as every AVX-512 one has, picks its build whose steps are fused as
 * here: __expf_fma): x * 32 / ln 2 = k + r, 2^(k/32) from the table, 2^(r/32) by a cubic, in double precision,
 * then rounded to float. Lanes with |x| >= 88 or NaN (overflow, underflow, special values) go to expf itself.
 * Checked against this glibc's expf on all 2^32 floats (tests/unit/test_kernels_cpu.py checks a sample, on every
 * machine it runs on). */
static const unsigned long long sf_exp2f_tab[32] = {
  0x3ff0000000000000ULL, 0x3fefd9b0d3158574ULL, 0x3fefb5586cf9890fULL, 0x3fef9301d0125b51ULL,
  0x3fef72b83c7d517bULL, 0x3fef54873168b9aaULL, 0x3fef387a6e756238ULL, 0x3fef1e9df51fdee1ULL,
  0x3fef06fe0a31b715ULL, 0x3feef1a7373aa9cbULL, 0x3feedea64c123422ULL, 0x3feece086061892dULL,
  0x3feebfdad5362a27ULL, 0x3feeb42b569d4f82ULL, 0x3feeab07dd485429ULL, 0x3feea47eb03a5585ULL,
  0x3feea09e667f3bcdULL, 0x3fee9f75e8ec5f74ULL, 0x3feea11473eb0187ULL, 0x3feea589994cce13ULL,
  0x3feeace5422aa0dbULL, 0x3feeb737b0cdc5e5ULL, 0x3feec49182a3f090ULL, 0x3feed503b23e255dULL,
  0x3feee89f995ad3adULL, 0x3feeff76f2fb5e47ULL, 0x3fef199bdd85529cULL, 0x3fef3720dcef9069ULL,
  0x3fef5818dcfba487ULL, 0x3fef7c97337b9b5fULL, 0x3fefa4afa2a490daULL, 0x3fefd0765b6e4540ULL};

static inline __m256 sf_expf8(__m256 x) {
  const __m512d invln2n = _mm512_set1_pd(0x1.71547652b82fep+5), shift = _mm512_set1_pd(0x1.8p+52);
  const __m512d c0 = _mm512_set1_pd(0x1.c6af84b912394p-20), c1 = _mm512_set1_pd(0x1.ebfce50fac4f3p-13);
  const __m512d c2 = _mm512_set1_pd(0x1.62e42ff0c52d6p-6), one = _mm512_set1_pd(1.0);
  __m512d xd = _mm512_cvtps_pd(x);
  __m512d kd = _mm512_fmadd_pd(invln2n, xd, shift);
  __m512i ki = _mm512_castpd_si512(kd);
  kd = _mm512_sub_pd(kd, shift);
  __m512d r = _mm512_fmsub_pd(invln2n, xd, kd);
  const long long *tab = (const long long *)sf_exp2f_tab;
  __m512i j = _mm512_and_si512(ki, _mm512_set1_epi64(31));
  __m512i lo = _mm512_permutex2var_epi64(_mm512_loadu_si512(tab), j, _mm512_loadu_si512(tab + 8));
  __m512i hi = _mm512_permutex2var_epi64(_mm512_loadu_si512(tab + 16), j, _mm512_loadu_si512(tab + 24));
  __mmask8 upper = _mm512_test_epi64_mask(j, _mm512_set1_epi64(16));
  __m512i t = _mm512_add_epi64(_mm512_mask_blend_epi64(upper, lo, hi), _mm512_slli_epi64(ki, 47));
  __m512d s = _mm512_castsi512_pd(t);
  __m512d z = _mm512_fmadd_pd(c0, r, c1);
  __m512d r2 = _mm512_mul_pd(r, r);
  __m512d y = _mm512_fmadd_pd(c2, r, one);
  y = _mm512_fmadd_pd(z, r2, y);
  y = _mm512_mul_pd(y, s);
  return _mm512_cvtpd_ps(y);
}

static inline __m512 sf_expf16(__m512 x) {
  __m512 e = _mm512_insertf32x8(_mm512_castps256_ps512(sf_expf8(_mm512_castps512_ps256(x))),
                                sf_expf8(_mm512_extractf32x8_ps(x, 1)), 1);
  __m512i top = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 20), _mm512_set1_epi32(0x7ff));
  __mmask16 odd = _mm512_cmpgt_epi32_mask(top, _mm512_set1_epi32(0x42a)); /* |x| >= 88 or NaN: expf's own path */
  if (odd) {
    float xs[16], es[16];
    _mm512_storeu_ps(xs, x);
    _mm512_storeu_ps(es, e);
    for (int c = 0; c < 16; c++)
      if (odd >> c & 1) es[c] = expf(xs[c]);
    e = _mm512_loadu_ps(es);
  }
  return e;
}

/* o[i] += w[m] * v_sn[m][i] (fused) and *total += w[m] for m in [m0, m1), in that order */
static inline void accumulate(float *o, float *total, const float *w, const int *sn, long m0, long m1,
                              const float *vbase, long D) {
  if (m1 <= m0) return;
  float sum = *total;
  long i0 = 0;
  for (; i0 + 64 <= D; i0 += 64) { /* 64 outputs at a time in 4 registers */
    __m512 o0 = _mm512_loadu_ps(o + i0), o1 = _mm512_loadu_ps(o + i0 + 16);
    __m512 o2 = _mm512_loadu_ps(o + i0 + 32), o3 = _mm512_loadu_ps(o + i0 + 48);
    const float *vb = vbase + i0;
    float x = *total;
    for (long m = m0; m < m1; m++) {
      const float *vr = vb + sn[m] * D;
      __m512 wv = _mm512_set1_ps(w[m]);
      o0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr), o0);
      o1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 16), o1);
      o2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 32), o2);
      o3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 48), o3);
      x += w[m];
    }
    if (i0 == 0) sum = x;
    _mm512_storeu_ps(o + i0, o0);
    _mm512_storeu_ps(o + i0 + 16, o1);
    _mm512_storeu_ps(o + i0 + 32, o2);
    _mm512_storeu_ps(o + i0 + 48, o3);
  }
  for (; i0 < D; i0 += 16) { /* the rest 16 (or fewer) at a time */
    __mmask16 k = D - i0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - i0)) - 1);
    __m512 o0 = _mm512_maskz_loadu_ps(k, o + i0);
    const float *vb = vbase + i0;
    float x = *total;
    for (long m = m0; m < m1; m++) {
      o0 = _mm512_fmadd_ps(_mm512_set1_ps(w[m]), _mm512_maskz_loadu_ps(k, vb + sn[m] * D), o0);
      x += w[m];
    }
    if (i0 == 0) sum = x;
    _mm512_mask_storeu_ps(o + i0, k, o0);
  }
  *total = sum;
}

/* accumulate() for two tokens, their m-th terms side by side (two independent chains of additions) */
static inline void accumulate2(float *oa, float *ta, const float *wa, const int *sa, long a0, long a1, float *ob,
                               float *tb, const float *wb, const int *sb, long b0, long b1, const float *vbase,
                               long D) {
  long n = a1 - a0 < b1 - b0 ? a1 - a0 : b1 - b0;
  if (D % 64 == 0 && n > 0) {
    float suma = *ta, sumb = *tb;
    for (long i0 = 0; i0 < D; i0 += 64) {
      __m512 p0 = _mm512_loadu_ps(oa + i0), p1 = _mm512_loadu_ps(oa + i0 + 16);
      __m512 p2 = _mm512_loadu_ps(oa + i0 + 32), p3 = _mm512_loadu_ps(oa + i0 + 48);
      __m512 q0 = _mm512_loadu_ps(ob + i0), q1 = _mm512_loadu_ps(ob + i0 + 16);
      __m512 q2 = _mm512_loadu_ps(ob + i0 + 32), q3 = _mm512_loadu_ps(ob + i0 + 48);
      const float *vb = vbase + i0;
      float xa = *ta, xb = *tb;
      for (long j = 0; j < n; j++) {
        const float *va = vb + sa[a0 + j] * D, *vv = vb + sb[b0 + j] * D;
        __m512 wva = _mm512_set1_ps(wa[a0 + j]), wvb = _mm512_set1_ps(wb[b0 + j]);
        p0 = _mm512_fmadd_ps(wva, _mm512_loadu_ps(va), p0);
        q0 = _mm512_fmadd_ps(wvb, _mm512_loadu_ps(vv), q0);
        p1 = _mm512_fmadd_ps(wva, _mm512_loadu_ps(va + 16), p1);
        q1 = _mm512_fmadd_ps(wvb, _mm512_loadu_ps(vv + 16), q1);
        p2 = _mm512_fmadd_ps(wva, _mm512_loadu_ps(va + 32), p2);
        q2 = _mm512_fmadd_ps(wvb, _mm512_loadu_ps(vv + 32), q2);
        p3 = _mm512_fmadd_ps(wva, _mm512_loadu_ps(va + 48), p3);
        q3 = _mm512_fmadd_ps(wvb, _mm512_loadu_ps(vv + 48), q3);
        xa += wa[a0 + j];
        xb += wb[b0 + j];
      }
      if (i0 == 0) suma = xa, sumb = xb;
      _mm512_storeu_ps(oa + i0, p0);
      _mm512_storeu_ps(oa + i0 + 16, p1);
      _mm512_storeu_ps(oa + i0 + 32, p2);
      _mm512_storeu_ps(oa + i0 + 48, p3);
      _mm512_storeu_ps(ob + i0, q0);
      _mm512_storeu_ps(ob + i0 + 16, q1);
      _mm512_storeu_ps(ob + i0 + 32, q2);
      _mm512_storeu_ps(ob + i0 + 48, q3);
    }
    *ta = suma, *tb = sumb;
    a0 += n, b0 += n;
  }
  accumulate(oa, ta, wa, sa, a0, a1, vbase, D);
  accumulate(ob, tb, wb, sb, b0, b1, vbase, D);
}

/* how many of the floats with bits start, start + step, .. (below 2^32) sf_expf16 gets other bits for than expf
 * (a test's check of the vector expf against this machine's libm; 0 where attention runs the plain loop) */
long sf_expf_mismatches(unsigned long start, unsigned long step) {
  long bad = 0;
  for (unsigned long b = start; b < (1UL << 32); b += 16 * step) {
    unsigned bits[16];
    float x[16], e[16];
    for (int c = 0; c < 16; c++) bits[c] = (unsigned)((b + c * step) & 0xffffffffUL);
    memcpy(x, bits, sizeof x);
    _mm512_storeu_ps(e, sf_expf16(_mm512_loadu_ps(x)));
    for (int c = 0; c < 16; c++) {
      float r = expf(x[c]);
      bad += memcmp(&r, &e[c], sizeof r) != 0;
    }
  }
  return bad;
}

static void attend(long T, const float *const *q, const float *const *mask, const long *lo, float *const *o,
                   const float *kbase, const float *vbase, long S, long D, float scale, float *work) {
  float *score[TB], *wt[TB];
  int *seen[TB];
  long count[TB], at[TB], first = S;
  float total[TB];
  for (long t = 0; t < T; t++) {
    score[t] = work + t * 2 * S;
    wt[t] = score[t] + S;
    seen[t] = (int *)(work + TB * 2 * S) + t * S;
    if (lo[t] < first) first = lo[t];
  }
  __m512 vbest[TB];
  const __m512 vscale = _mm512_set1_ps(scale), hidden_at = _mm512_set1_ps(-3.0e38f);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY), lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                            13, 14, 15);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (long t = 0; t < T; t++) vbest[t] = neg_inf;
  for (long b = first; b < S; b += 16) {
    long n = S - b < 16 ? S - b : 16;
    __mmask16 live = (__mmask16)((1u << n) - 1);
    const float *kr[16]; /* lanes past S repeat column b (read, then dropped) */
    for (int c = 0; c < 16; c++) kr[c] = kbase + (b + (c < n ? c : 0)) * D;
    for (long t = 0; t < T; t++) {
      if (b + n <= lo[t]) continue;
      __m512 dots = dots16(q[t], kr, D);
      __m512 m = _mm512_maskz_loadu_ps(live, mask[t] + b);
      /* hidden: masked, or before the token's window (never looked at) */
      __mmask16 hidden = _mm512_cmp_ps_mask(m, hidden_at, _CMP_LE_OQ) |
                         _mm512_cmp_ps_mask(lane, _mm512_set1_ps((float)(lo[t] - b)), _CMP_LT_OQ);
      __m512 sc = _mm512_mask_blend_ps(hidden, _mm512_fmadd_ps(dots, vscale, m), neg_inf);
      _mm512_mask_storeu_ps(score[t] + b, live, sc);
      vbest[t] = _mm512_mask_max_ps(vbest[t], live, sc, vbest[t]);
    }
  }
  for (long t = 0; t < T; t++) {
    const __m512 vb = _mm512_set1_ps(_mm512_reduce_max_ps(vbest[t]));
    float *w = wt[t];
    int *sn = seen[t];
    long k = 0;
    for (long s = lo[t]; s < S; s += 16) {
      long n = S - s < 16 ? S - s : 16;
      __mmask16 live = (__mmask16)((1u << n) - 1);
      __m512 sc = _mm512_maskz_loadu_ps(live, score[t] + s);
      __mmask16 keep = live & _mm512_cmp_ps_mask(sc, neg_inf, _CMP_NEQ_UQ); /* visible (NaN too, as expf's) */
      __m512 e = sf_expf16(_mm512_maskz_sub_ps(keep, sc, vb));              /* the others: exp(0), dropped */
      _mm512_mask_compressstoreu_ps(w + k, keep, e);
      _mm512_mask_compressstoreu_epi32(sn + k, keep, _mm512_add_epi32(_mm512_set1_epi32((int)s), lanes));
      k += __builtin_popcount(keep);
    }
    count[t] = k;
    at[t] = 0;
    total[t] = 0.f;
    for (long i = 0; i < D; i++) o[t][i] = 0.f;
  }
  long cb = 16384 / (D * 4); /* columns per block of values: 16 KiB */
  if (cb < 16) cb = 16;
  for (long c0 = first; c0 < S; c0 += cb) {
    long m0[TB], m1[TB];
    for (long t = 0; t < T; t++) { /* the token's visible columns in [c0, c0 + cb): its terms m0 .. m1 - 1 */
      long m = at[t], end = count[t];
      const int *sn = seen[t];
      m0[t] = m;
      while (m < end && sn[m] < c0 + cb) m++;
      m1[t] = at[t] = m;
    }
    long t = 0;
    for (; t + 1 < T; t += 2)
      accumulate2(o[t], total + t, wt[t], seen[t], m0[t], m1[t], o[t + 1], total + t + 1, wt[t + 1], seen[t + 1],
                  m0[t + 1], m1[t + 1], vbase, D);
    if (t < T) accumulate(o[t], total + t, wt[t], seen[t], m0[t], m1[t], vbase, D);
  }
  for (long t = 0; t < T; t++) {
    float inv = total[t] > 0.f ? 1.f / total[t] : 0.f;
    for (long i = 0; i < D; i++) o[t][i] *= inv;
  }
}
#else
static void attend(long T, const float *const *q, const float *const *mask, const long *lo, float *const *o,
                   const float *kbase, const float *vbase, long S, long D, float scale, float *work) {
  float *score = work;
  for (long t = 0; t < T; t++) {
    float best = -INFINITY, *ot = o[t];
    for (long s = lo[t]; s < S; s++) {
      if (mask[t][s] <= -3.0e38f) { score[s] = -INFINITY; continue; }
      score[s] = dot(q[t], kbase + s * D, D) * scale + mask[t][s];
      if (score[s] > best) best = score[s];
    }
    for (long i = 0; i < D; i++) ot[i] = 0.f;
    float total = 0.f;
    for (long s = lo[t]; s < S; s++) {
      if (score[s] == -INFINITY) continue;
      float wgt = expf(score[s] - best);
      total += wgt;
      const float *vr = vbase + s * D;
      for (long i = 0; i < D; i++) ot[i] += wgt * vr[i];
    }
    float inv = total > 0.f ? 1.f / total : 0.f;
    for (long i = 0; i < D; i++) ot[i] *= inv;
  }
}
long sf_expf_mismatches(unsigned long start, unsigned long step) {
  (void)start, (void)step;
  return 0;
}
#endif

long sf_layer(float *x, long P, long G, long hidden, const float *w_in, const float *w_post, float eps,
              const float *qkv_p, const float *qkv_b, const float *o_p, const float *o_b, const float *gu_p,
              const float *gu_b, long inter, const float *dn_p, const float *dn_b, const float *q_norm,
              const float *k_norm, const float *cosv, const float *sinv, float *kc, float *vc, long kv_heads,
              long columns, long D, long H, const long *rows, const long *cols, const float *bias,
              const long *bias_row, long S, const long *pos, long window, int threads) {
  if (D > 1024 || P % G) return -1;
  long pm = P / G, qs = H * D, kvs = kv_heads * D, qkv_n = qs + 2 * kvs, group_heads = H / kv_heads;
  float *h = malloc(sizeof(float) * P * hidden), *qkv = malloc(sizeof(float) * P * qkv_n);
  float *att = malloc(sizeof(float) * P * qs), *gu = malloc(sizeof(float) * P * 2 * inter);
  float *act = malloc(sizeof(float) * P * inter), *y = malloc(sizeof(float) * P * hidden);
  if (!h || !qkv || !att || !gu || !act || !y) {
    free(h); free(qkv); free(att); free(gu); free(act); free(y);
    return -2;
  }
  rmsnorm_rows(x, w_in, h, P, pm, hidden, eps);
  sf_gemm(h, qkv_p, qkv_b, qkv, G, pm, qkv_n, hidden, threads);
  for (long p = 0; p < P; p++) {
    float *q = qkv + p * qkv_n, *k = q + qs, *v = k + kvs;
    long member = p / pm;
    if (q_norm) {
      for (long hh = 0; hh < H; hh++) rmsnorm_rows(q + hh * D, q_norm + member * D, q + hh * D, 1, 1, D, eps);
      for (long hh = 0; hh < kv_heads; hh++) rmsnorm_rows(k + hh * D, k_norm + member * D, k + hh * D, 1, 1, D, eps);
    }
    for (long hh = 0; hh < H; hh++) rope_head(q + hh * D, cosv + p * D, sinv + p * D, D);
    for (long hh = 0; hh < kv_heads; hh++) {
      rope_head(k + hh * D, cosv + p * D, sinv + p * D, D);
      float *kd = kc + ((rows[p] * kv_heads + hh) * columns + cols[p]) * D;
      float *vd = vc + ((rows[p] * kv_heads + hh) * columns + cols[p]) * D;
      for (long i = 0; i < D; i++) { kd[i] = k[hh * D + i]; vd[i] = v[hh * D + i]; }
    }
  }
  float scale = 1.f / sqrtf((float)D);
  /* runs of up to TB consecutive tokens on one cache row; a job is one head of one run (head-major, so a head's
   * keys and values stay in cache from one run to the next) */
  long *run = malloc(sizeof(long) * (P + 1)), runs = 0;
  if (!run) {
    free(h); free(qkv); free(att); free(gu); free(act); free(y);
    return -2;
  }
  for (long p = 0; p < P; p++)
    if (p == 0 || rows[p] != rows[p - 1] || p - run[runs - 1] == TB) run[runs++] = p;
  run[runs] = P;
  long jobs = runs * H;
  int att_threads = (threads > 1 && (double)P * H * S * D > 262144.0) ? threads : 1;
#pragma omp parallel num_threads(att_threads) if (att_threads > 1)
  {
    long n = S > 0 ? S : 1;
    float *work = malloc((sizeof(float) * 2 + sizeof(int)) * TB * n);
#pragma omp for schedule(static)
    for (long job = 0; job < jobs; job++) {
      long hh = job / runs, r = job % runs, kvh = hh / group_heads, p0 = run[r], T = run[r + 1] - p0;
      const float *q[TB], *mask[TB];
      float *o[TB];
      long lo[TB];
      for (long t = 0; t < T; t++) {
        long p = p0 + t;
        q[t] = qkv + p * qkv_n + hh * D;
        mask[t] = bias + bias_row[p] * S;
        o[t] = att + p * qs + hh * D;
        lo[t] = window > 0 ? pos[p] - window + 1 : 0; /* columns <= pos - window are out of the window */
        if (lo[t] < 0) lo[t] = 0;
      }
      attend(T, q, mask, lo, o, kc + (rows[p0] * kv_heads + kvh) * columns * D,
             vc + (rows[p0] * kv_heads + kvh) * columns * D, S, D, scale, work);
    }
    free(work);
  }
  free(run);
  sf_gemm(att, o_p, o_b, y, G, pm, hidden, qs, threads);
  for (long i = 0; i < P * hidden; i++) x[i] += y[i];
  rmsnorm_rows(x, w_post, h, P, pm, hidden, eps);
  sf_gemm(h, gu_p, gu_b, gu, G, pm, 2 * inter, hidden, threads);
  for (long p = 0; p < P; p++) {
    const float *gate = gu + p * 2 * inter, *up = gate + inter;
    for (long i = 0; i < inter; i++) act[p * inter + i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
  }
  sf_gemm(act, dn_p, dn_b, y, G, pm, hidden, inter, threads);
  for (long i = 0; i < P * hidden; i++) x[i] += y[i];
  free(h); free(qkv); free(att); free(gu); free(act); free(y);
  return 0;
}

/* ---- every decoder layer of a forward in one call -----------------------------------------------------------------
 * At batch 1 a forward's own Python (argument checks, ctypes marshalling of ~34 arguments) cost ~30 us a layer over
 * sf_layer's work; this runs the L layers back to back from a table the runner builds (and checks) once per set of
 * weights and KV cache buffers: per layer SF_LAYER_FIELDS int64 entries, see cpu_gemm.py `LayerTable`. Each layer is
 * exactly sf_layer's arithmetic, so outputs are bit for bit those of L sf_layer calls. Returns the first failure's
 * code (sf_layer's), with x holding the layers done before it. */
#define SF_LAYER_FIELDS 16
long sf_layer_fields(void) { return SF_LAYER_FIELDS; }

long sf_layers(const long *table, long L, float *x, long P, long G, long hidden, float eps, const float *cosv,
               const float *sinv, long kv_heads, long columns, long D, long H, const long *rows, const long *cols,
               const float *bias, const long *bias_row, long S, const long *pos, int threads) {
  for (long l = 0; l < L; l++) {
    const long *t = table + l * SF_LAYER_FIELDS;
#define F(i) ((const float *)(size_t)t[i])
    long done = sf_layer(x, P, G, hidden, F(0), F(1), eps, F(2), F(3), F(4), F(5), F(6), F(7), t[8], F(9), F(10),
                         F(11), F(12), cosv, sinv, (float *)(size_t)t[13], (float *)(size_t)t[14], kv_heads, columns,
                         D, H, rows, cols, bias, bias_row, S, pos, t[15], threads);
#undef F
    if (done != 0) return done;
  }
  return 0;
}
