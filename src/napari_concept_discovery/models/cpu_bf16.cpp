// bf16 kernels of a ViT block for x86 CPUs with AVX512-BF16 (vdpbf16ps): self-attention,
// flash style, and the MLP's bias + GELU in one pass.
//
// Attention: out = softmax(scale * Q K^T) V for every (batch, head), no mask, with an optional LayerNorm
// of q and k over the head dim first (timm's qk-norm). Q, K, V are bf16 in any
// (B, N, H, D) strides with unit stride along D; out is a contiguous (B, N, H, D) bf16 array,
// i.e. already the (B, N, H*D) layout of the projection that follows.
//
// Per (batch, head), Q is normalised into contiguous rows, K packed once as pair-interleaved
// 16-key blocks (so one zmm holds 16 keys x 2 dims for vdpbf16ps) and V as pair-interleaved
// rows (2 keys x D), zero-padded to a multiple of 16 keys. Then every task (batch, head, 96 query rows) walks the keys in chunks:
// scores of 6 rows x 64 keys in 24 fp32 registers, an online softmax in fp32 (running max and
// sum, a vectorised 2^x; scores are finite for finite inputs), the probabilities rounded to bf16, and P V accumulated in fp32.
//
// No global mutable state: buffers belong to the call, scratch to each thread, so two calls
// from two Python threads at once are independent. Threads are plain std::threads made per
// call (no OpenMP runtime next to torch's, no spinning workers left behind).

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

typedef uint16_t bf16;

constexpr int MR = 6;         // query rows per register tile
constexpr int KC = 256;       // keys per softmax chunk
constexpr int QTILE = 16 * MR;  // query rows per task

inline int32_t pair_at(const bf16* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 2^x in fp32 for finite x: a degree-4 fit of 2^f on [-0.5, 0.5] (relative error < 4e-6, far
// below the bf16 rounding that follows), scaled by 2^round(x); underflows to 0 far below -126.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.676037097872046e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.592203564726439e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022107355830133e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931210339915465e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000754953495f));
  return _mm512_scalef_ps(p, n);
}

// S[r][16n..16n+15] = sum_d q[r][d] K[key][d] for NR blocks of 16 keys; kp points at the first
// block, blocks are `block` bf16 apart, `pairs` = D/2.
template <int NR>
inline void qk_tile(const bf16* const* q, const bf16* kp, int64_t block, int pairs, float* S) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    __m512bh kv[NR];
    for (int n = 0; n < NR; ++n)
      kv[n] = (__m512bh)_mm512_loadu_si512((const void*)(kp + n * block + p * 32));
    for (int r = 0; r < MR; ++r) {
      __m512bh qa = (__m512bh)_mm512_set1_epi32(pair_at(q[r] + 2 * p));
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], qa, kv[n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) _mm512_storeu_ps(S + r * KC + n * 16, acc[r][n]);
}

// O[r][d0 .. d0+16*NV) += sum over `npairs` key pairs of P[r][key] V[key][d]; vp points at the
// chunk's first key pair, pairs are 2*D bf16 apart.
template <int NV>
inline void pv_tile(const bf16* P, const bf16* vp, int64_t D, int npairs, float* O, int d0) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_loadu_ps(O + r * D + d0 + n * 16);
  for (int jp = 0; jp < npairs; ++jp) {
    __m512bh vv[NV];
    const bf16* row = vp + jp * 2 * D + 2 * d0;
    for (int n = 0; n < NV; ++n) vv[n] = (__m512bh)_mm512_loadu_si512((const void*)(row + n * 32));
    for (int r = 0; r < MR; ++r) {
      __m512bh pa = (__m512bh)_mm512_set1_epi32(pair_at(P + r * KC + 2 * jp));
      for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], pa, vv[n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(O + r * D + d0 + n * 16, acc[r][n]);
}

struct Args {
  const bf16 *q, *k, *v;
  bf16* out;
  int64_t B, N, H, D;
  int64_t qs[3], ks[3], vs[3];  // strides (elements) of batch, token, head
  const float *qw, *qb, *kw, *kb;  // LayerNorm weights and biases of q and k, or null
  float eps, scale;
  int64_t npad;                 // N rounded up to 16
  bf16 *qp, *kp, *vp;           // packed Q, K and V of every (batch, head)
};

inline __m512 load_bf16(const bf16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// dst = LayerNorm over D of src (fp32 statistics, weight w and bias b), or a copy where w is
// null; D is a multiple of 32.
void norm_row(const bf16* src, bf16* dst, int64_t D, const float* w, const float* b, float eps) {
  if (!w) {
    std::memcpy(dst, src, D * sizeof(bf16));
    return;
  }
  __m512 s = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) s = _mm512_add_ps(s, load_bf16(src + d));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / (float)D);
  __m512 ss = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m512 t = _mm512_sub_ps(load_bf16(src + d), mean);
    ss = _mm512_fmadd_ps(t, t, ss);
  }
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)D + eps));
  for (int64_t d = 0; d < D; d += 16) {
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(load_bf16(src + d), mean), rstd);
    t = _mm512_fmadd_ps(t, _mm512_loadu_ps(w + d), _mm512_loadu_ps(b + d));
    _mm256_storeu_si256((__m256i*)(dst + d), (__m256i)_mm512_cvtneps_pbh(t));
  }
}

// Q (normalised) as contiguous rows, K (normalised) as 16-key blocks of D/2 pairs, V as key
// pairs x D, for one (batch, head); keys past N are zero.
void pack_head(const Args& a, int64_t bh, bf16* row) {
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D, pairs = D / 2;
  bf16* qp = a.qp + bh * a.npad * D;
  bf16* kp = a.kp + bh * a.npad * D;
  bf16* vp = a.vp + bh * a.npad * D;
  for (int64_t j = 0; j < a.npad; ++j) {
    const bool ok = j < a.N;
    bf16* kb = kp + (j / 16) * 16 * D + (j % 16) * 2;  // block of 16 keys x D
    bf16* vb = vp + (j / 2) * 2 * D + (j % 2);         // pair of keys x D
    if (ok) {
      norm_row(a.q + b * a.qs[0] + j * a.qs[1] + h * a.qs[2], qp + j * D, D, a.qw, a.qb, a.eps);
      norm_row(a.k + b * a.ks[0] + j * a.ks[1] + h * a.ks[2], row, D, a.kw, a.kb, a.eps);
    } else {
      std::memset(row, 0, D * sizeof(bf16));
    }
    for (int64_t p = 0; p < pairs; ++p) {
      kb[p * 32] = row[2 * p];
      kb[p * 32 + 1] = row[2 * p + 1];
    }
    const bf16* vr = a.v + b * a.vs[0] + j * a.vs[1] + h * a.vs[2];
    for (int64_t d = 0; d < D; ++d) vb[2 * d] = ok ? vr[d] : 0;
  }
}

inline __mmask16 valid_mask(int64_t remaining) {
  if (remaining >= 16) return 0xFFFF;
  if (remaining <= 0) return 0;
  return (__mmask16)((1u << remaining) - 1u);
}

struct Scratch {
  float* S;   // MR x KC scores
  bf16* P;    // MR x KC probabilities
  float* O;   // MR x D accumulators
};

void run_task(const Args& a, int64_t task, Scratch& w) {
  const int64_t ntile = (a.N + QTILE - 1) / QTILE;
  const int64_t bh = task / ntile, q0 = (task % ntile) * QTILE;
  const int64_t b = bh / a.H, h = bh % a.H, D = a.D;
  const int pairs = (int)(D / 2);
  const bf16* qp = a.qp + bh * a.npad * D;
  const bf16* kp = a.kp + bh * a.npad * D;
  const bf16* vp = a.vp + bh * a.npad * D;
  const float c = a.scale * 1.4426950408889634f;  // scores to base 2
  const int64_t qend = q0 + QTILE < a.N ? q0 + QTILE : a.N;
  for (int64_t r0 = q0; r0 < qend; r0 += MR) {
    const bf16* q[MR];
    for (int r = 0; r < MR; ++r) {
      const int64_t i = r0 + r < a.N ? r0 + r : a.N - 1;  // rows past the end repeat the last
      q[r] = qp + i * D;
    }
    float m[MR], l[MR];
    for (int r = 0; r < MR; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.f;
    }
    std::memset(w.O, 0, sizeof(float) * MR * D);
    for (int64_t j0 = 0; j0 < a.npad; j0 += KC) {
      const int kc = (int)(a.npad - j0 < KC ? a.npad - j0 : KC);  // multiple of 16
      int n = 0;
      for (; n + 64 <= kc; n += 64) qk_tile<4>(q, kp + (j0 + n) * D, 16 * D, pairs, w.S + n);
      for (; n < kc; n += 16) qk_tile<1>(q, kp + (j0 + n) * D, 16 * D, pairs, w.S + n);
      for (int r = 0; r < MR; ++r) {
        float* s = w.S + r * KC;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < kc; j += 16)
          mx = _mm512_mask_max_ps(mx, valid_mask(a.N - j0 - j), mx, _mm512_loadu_ps(s + j));
        const float mnew = std::fmax(m[r], _mm512_reduce_max_ps(mx));
        const float alpha = std::exp2((m[r] - mnew) * c);  // 0 on the first chunk
        const __m512 cv = _mm512_set1_ps(c), off = _mm512_set1_ps(mnew * c);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < kc; j += 16) {
          __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), cv, off));
          e = _mm512_maskz_mov_ps(valid_mask(a.N - j0 - j), e);
          sum = _mm512_add_ps(sum, e);
          _mm256_storeu_si256((__m256i*)(w.P + r * KC + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
        m[r] = mnew;
        if (alpha != 1.f) {
          const __m512 av = _mm512_set1_ps(alpha);
          float* o = w.O + r * D;
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), av));
        }
      }
      const bf16* vc = vp + j0 * D;  // pair j0/2, pairs 2*D apart
      int d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) pv_tile<4>(w.P, vc, D, kc / 2, w.O, d0);
      for (; d0 < D; d0 += 32) pv_tile<2>(w.P, vc, D, kc / 2, w.O, d0);
    }
    for (int r = 0; r < MR && r0 + r < a.N; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      bf16* o = a.out + ((b * a.N + r0 + r) * a.H + h) * D;
      for (int64_t d = 0; d < D; d += 16) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(w.O + r * D + d), inv);
        _mm256_storeu_si256((__m256i*)(o + d), (__m256i)_mm512_cvtneps_pbh(x));
      }
    }
  }
}

// Runs body on this thread and nthreads - 1 new ones; bodies take work from a shared atomic
// counter, so where a thread cannot be made the others do its share (no exception escapes).
template <class F>
void on_threads(int nthreads, F&& body) {
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) {
    try {
      pool.emplace_back(body);
    } catch (...) {
      break;
    }
  }
  body();
  for (auto& th : pool) th.join();
}

// GELU(x) = x Phi(x) with the normal CDF from erfc (Abramowitz & Stegun 7.1.26, absolute error
// < 1.5e-7 on erfc, taken without cancellation on either side of 0); the output is bf16 anyway.
inline __m512 gelu_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  // erfc(z) = p exp(-z^2); Phi(x) = erfc(z) / 2 for x < 0, 1 - erfc(z) / 2 else
  __m512 zz = _mm512_mul_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(-1.4426950408889634f));
  zz = _mm512_max_ps(_mm512_set1_ps(-150.f), zz);  // finite for exp2_ps; NaN stays NaN
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(p, exp2_ps(zz)), _mm512_set1_ps(0.5f));
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.f), half_erfc),
                                          half_erfc);
  return _mm512_mul_ps(x, phi);
}

void bias_gelu_rows(const bf16* x, int64_t row_stride, int64_t cols, const float* bias, bf16* out,
                    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const bf16* src = x + r * row_stride;
    bf16* dst = out + r * cols;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = valid_mask(cols - c);
      __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src + c));
      __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + c));
      _mm256_mask_storeu_epi16(dst + c, m, (__m256i)_mm512_cvtneps_pbh(gelu_ps(v)));
    }
  }
}

}  // namespace

extern "C" {

// out (rows x cols, contiguous) = GELU(x + bias) for bf16 rows of x `row_stride` apart, fp32
// bias (or null), in fp32 with one rounding to bf16.
void ncd_bias_gelu_bf16(const uint16_t* x, int64_t rows, int64_t cols, int64_t row_stride,
                        const float* bias, uint16_t* out, int nthreads) {
  if (rows < 1 || cols < 1) return;
  const int64_t chunk = 64;  // rows per task
  const int64_t tasks = (rows + chunk - 1) / chunk;
  if (nthreads < 1) nthreads = 1;
  if (nthreads > tasks) nthreads = (int)tasks;
  std::atomic<int64_t> next{0};
  on_threads(nthreads, [&]() {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t r0 = t * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
      bias_gelu_rows(x, row_stride, cols, bias, out, r0, r1);
    }
  });
}

// 1 where this build's instructions run on this CPU (checked by the caller before any call).
int ncd_bf16_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// q and k are first normalised over D where qw/kw (LayerNorm weight, with bias qb/kb, fp32)
// are given. Returns 0, 1 on bad arguments (D not a positive multiple of 32, N < 1), 2 when
// out of memory.
int ncd_attention_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                       int64_t B, int64_t N, int64_t H, int64_t D, const int64_t* qs,
                       const int64_t* ks, const int64_t* vs, const float* qw, const float* qb,
                       const float* kw, const float* kb, float eps, float scale, int nthreads) {
  if (D <= 0 || D % 32 || N < 1 || B < 1 || H < 1) return 1;
  Args a;
  a.q = q; a.k = k; a.v = v; a.out = out;
  a.B = B; a.N = N; a.H = H; a.D = D;
  for (int i = 0; i < 3; ++i) { a.qs[i] = qs[i]; a.ks[i] = ks[i]; a.vs[i] = vs[i]; }
  a.qw = qw; a.qb = qb; a.kw = kw; a.kb = kb;
  a.eps = eps;
  a.scale = scale;
  a.npad = (N + 15) / 16 * 16;
  const int64_t heads = B * H;
  const size_t packed = ((size_t)heads * a.npad * D * sizeof(bf16) + 63) / 64 * 64;
  a.qp = (bf16*)std::aligned_alloc(64, packed);
  a.kp = (bf16*)std::aligned_alloc(64, packed);
  a.vp = (bf16*)std::aligned_alloc(64, packed);
  if (!a.qp || !a.kp || !a.vp) {
    std::free(a.qp);
    std::free(a.kp);
    std::free(a.vp);
    return 2;
  }
  if (nthreads < 1) nthreads = 1;
  const int64_t tasks = heads * ((N + QTILE - 1) / QTILE);
  if (nthreads > tasks) nthreads = (int)tasks;

  std::atomic<int64_t> next_head{0};
  on_threads(nthreads, [&]() {
    std::vector<bf16> row(D);
    for (int64_t bh; (bh = next_head.fetch_add(1)) < heads;) pack_head(a, bh, row.data());
  });
  std::atomic<int64_t> next_task{0};
  on_threads(nthreads, [&]() {
    Scratch w;
    w.S = (float*)std::aligned_alloc(64, sizeof(float) * MR * KC);
    w.P = (bf16*)std::aligned_alloc(64, sizeof(bf16) * MR * KC);
    w.O = (float*)std::aligned_alloc(64, (sizeof(float) * MR * D + 63) / 64 * 64);
    if (w.S && w.P && w.O)  // a thread without scratch leaves its tasks to the others
      for (int64_t t; (t = next_task.fetch_add(1)) < tasks;) run_task(a, t, w);
    std::free(w.S);
    std::free(w.P);
    std::free(w.O);
  });
  std::free(a.qp);
  std::free(a.kp);
  std::free(a.vp);
  return next_task.load() < tasks ? 2 : 0;  // no thread had scratch
}

}  // extern "C"
