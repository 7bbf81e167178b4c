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
  long jobs = P * H;
  int att_threads = (threads > 1 && (double)jobs * S * D > 262144.0) ? threads : 1;
#pragma omp parallel num_threads(att_threads) if (att_threads > 1)
  {
    float *score = malloc(sizeof(float) * (S > 0 ? S : 1));
#pragma omp for schedule(static)
    for (long job = 0; job < jobs; job++) {
      long p = job / H, hh = job % H, kvh = hh / group_heads;
      const float *q = qkv + p * qkv_n + hh * D, *mask = bias + bias_row[p] * S;
      const float *kbase = kc + (rows[p] * kv_heads + kvh) * columns * D;
      const float *vbase = vc + (rows[p] * kv_heads + kvh) * columns * D;
      long lo = window > 0 ? pos[p] - window + 1 : 0; /* columns <= pos - window are out of the window */
      if (lo < 0) lo = 0;
      float best = -INFINITY;
      for (long s = lo; s < S; s++) {
        if (mask[s] <= -3.0e38f) { score[s] = -INFINITY; continue; }
        const float *kr = kbase + s * D;
        score[s] = dot(q, kr, D) * scale + mask[s];
        if (score[s] > best) best = score[s];
      }
      float *o = att + p * qs + hh * D;
      for (long i = 0; i < D; i++) o[i] = 0.f;
      float total = 0.f;
      for (long s = lo; s < S; s++) {
        if (score[s] == -INFINITY) continue;
        float wgt = expf(score[s] - best);
        total += wgt;
        const float *vr = vbase + s * D;
        for (long i = 0; i < D; i++) o[i] += wgt * vr[i];
      }
      float inv = total > 0.f ? 1.f / total : 0.f;
      for (long i = 0; i < D; i++) o[i] *= inv;
    }
    free(score);
  }
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
