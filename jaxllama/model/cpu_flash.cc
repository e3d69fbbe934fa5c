// Causal (grouped-query) attention for training on XLA:CPU, forward and backward, through the XLA FFI
// (see jaxllama/model/cpu_kernels.py ``flash_attention`` and jaxllama.model.attention, whose
// reference ``xla_attention`` it equals).
//
//   q [b, t, h, d], k, v [b, t, kv, d] (the model's own layout: no transposes), seg [b, t] int32:
//   out = softmax(q k^T / sqrt(d) + mask) v, mask: key j <= query i and seg[j] == seg[i];
//   lse [b, h, t]: the log-sum-exp of each query's scores (the backward's residual).
//
// Blocked as FlashAttention is: 64 queries x 64 keys at a time, with an online softmax, so the
// [t, t] scores are never written out, and key blocks above the diagonal (or whose segments cannot
// meet the query block's) are skipped: half the work of causal attention, where XLA's reference
// computes every block (twice: the backward recomputes them). The products are register-blocked
// micro-kernels on L1-resident blocks; e^x is a vector polynomial. Forward work units are
// (row, KV head, query block), its group of query heads sharing each transposed key block; the
// backward's are (row, KV head), over key blocks: dK and dV of a block stay in registers' reach
// while every later query block adds to them, and dQ goes straight to the unit's own rows.

#include <cmath>
#include <limits>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllama_kernels;

constexpr int64_t BQ = 64, BK = 64;  // queries, keys per block (BK a multiple of 2 W)
#if defined(__AVX512F__)
constexpr int MR = 8;  // rows per micro-kernel: MR x 2 vectors of accumulators
#elif defined(__AVX2__)
constexpr int MR = 6;
#else
constexpr int MR = 4;
#endif
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C[m, n] (+)= A[m, k] B[k, n]; row-major with leading dims; A transposed (TA: A(i, p) = A[p * lda + i]);
// n a multiple of W. ZERO: C is not read (C = A B).
template <bool TA, bool ZERO, int R>
inline void tile(int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    typename V::T c0[R], c1[R];
    for (int r = 0; r < R; ++r) {
      c0[r] = ZERO ? V::zero() : V::load(C + r * ldc + j);
      c1[r] = ZERO ? V::zero() : V::load(C + r * ldc + j + W);
    }
    for (int64_t p = 0; p < k; ++p) {
      const typename V::T b0 = V::load(B + p * ldb + j), b1 = V::load(B + p * ldb + j + W);
      for (int r = 0; r < R; ++r) {
        const typename V::T a = V::set1(TA ? A[p * lda + r] : A[r * lda + p]);
        c0[r] = V::fma(a, b0, c0[r]);
        c1[r] = V::fma(a, b1, c1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      V::store(C + r * ldc + j, c0[r]);
      V::store(C + r * ldc + j + W, c1[r]);
    }
  }
  for (; j < n; j += W) {
    typename V::T c0[R];
    for (int r = 0; r < R; ++r) c0[r] = ZERO ? V::zero() : V::load(C + r * ldc + j);
    for (int64_t p = 0; p < k; ++p) {
      const typename V::T b0 = V::load(B + p * ldb + j);
      for (int r = 0; r < R; ++r) c0[r] = V::fma(V::set1(TA ? A[p * lda + r] : A[r * lda + p]), b0, c0[r]);
    }
    for (int r = 0; r < R; ++r) V::store(C + r * ldc + j, c0[r]);
  }
}

template <bool TA, bool ZERO, int R>
inline void rows_tail(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (m == R) return tile<TA, ZERO, R>(n, k, A, lda, B, ldb, C, ldc);
    rows_tail<TA, ZERO, R - 1>(m, n, k, A, lda, B, ldb, C, ldc);
  }
}

template <bool TA, bool ZERO>
void gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<TA, ZERO, MR>(n, k, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc);
  if (i < m) rows_tail<TA, ZERO, MR - 1>(m - i, n, k, A + (TA ? i : i * lda), lda, B, ldb, C + i * ldc, ldc);
}

struct Flash {
  const float *q, *k, *v, *out = nullptr, *lse_in = nullptr, *dout = nullptr;
  const int32_t* seg;
  float *o = nullptr, *lse = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int64_t b = 0, t = 0, h = 0, kv = 0, d = 0, nqb = 0;
  float scale = 1.f;
  std::vector<int32_t> smin, smax;  // [b, blocks of 64]: each block's least and greatest segment id
};

inline int64_t qrow(const Flash& f, int64_t row, int64_t i, int64_t head) { return ((row * f.t + i) * f.h + head) * f.d; }
inline int64_t krow(const Flash& f, int64_t row, int64_t j, int64_t head) { return ((row * f.t + j) * f.kv + head) * f.d; }

// Whether query block qb and key block kb of row `row` have any pair to attend (causal, segments can
// meet), and whether some pair in them is masked (else no mask is applied).
inline bool meets(const Flash& f, int64_t row, int64_t qb, int64_t kb) {
  if (kb * BK > qb * BQ + BQ - 1) return false;
  const int64_t nb = f.nqb;
  return f.smin[row * nb + qb] <= f.smax[row * nb + kb] && f.smin[row * nb + kb] <= f.smax[row * nb + qb];
}
// Whether query block qb and key block kb of row `row` lie in one segment (no segment mask needed).
inline bool one_segment(const Flash& f, int64_t row, int64_t qb, int64_t kb) {
  const int64_t nb = f.nqb;
  return f.smin[row * nb + qb] == f.smax[row * nb + qb] && f.smin[row * nb + kb] == f.smax[row * nb + kb] &&
         f.smin[row * nb + qb] == f.smin[row * nb + kb];
}

// Masks S [qn, BK] of query rows i0.. and keys j0..j0+kn to -inf: keys after the query, padding
// columns past kn, and (unless `same`: one segment) keys of another segment. A whole block below
// the diagonal in one segment has nothing to mask.
inline void apply_mask(const Flash& f, int64_t row, float* S, int64_t i0, int64_t qn, int64_t j0, int64_t kn, bool same) {
  if (same && j0 + BK <= i0 && kn == BK) return;
  const int32_t* seg = f.seg + row * f.t;
  for (int64_t r = 0; r < qn; ++r) {
    const int64_t i = i0 + r;
    const int64_t lim = std::max<int64_t>(0, std::min<int64_t>(kn, i - j0 + 1));  // keys [0, lim) are causal
    float* s = S + r * BK;
    if (!same)
      for (int64_t c = 0; c < lim; ++c)
        if (seg[j0 + c] != seg[i]) s[c] = NEG_INF;
    std::fill(s + lim, s + BK, NEG_INF);
  }
}

// Key (or value) block kb of head kvh, zero padded past kn keys: (when Kt) transposed and times `mul`
// into Kt [d, BK]; (when Kb) as it is into Kb [BK, d].
inline void load_keys(const Flash& f, const float* src, int64_t row, int64_t kvh, int64_t j0, int64_t kn, float mul,
                      float* Kt, float* Kb) {
  const int64_t d = f.d;
  for (int64_t c = 0; c < BK; ++c) {
    const float* x = c < kn ? src + krow(f, row, j0 + c, kvh) : nullptr;
    if (Kt)
      for (int64_t e = 0; e < d; ++e) Kt[e * BK + c] = x ? x[e] * mul : 0.f;
    if (Kb)
      for (int64_t e = 0; e < d; ++e) Kb[c * d + e] = x ? x[e] : 0.f;
  }
}

// ---- forward ------------------------------------------------------------------------------------

void forward_units(const Problem& p, int64_t u0, int64_t u1) {
  const Flash& f = *reinterpret_cast<const Flash*>(p.x);
  const int64_t d = f.d, g = f.h / f.kv, ld = f.h * f.d;
  thread_local std::vector<float> buf;
  buf.resize(size_t(d * BK + BK * d + BQ * BK + g * BQ * (d + 2)));
  float *Kt = buf.data(), *Vb = Kt + d * BK, *S = Vb + BK * d, *O = S + BQ * BK, *M = O + g * BQ * d, *L = M + g * BQ;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t qb = u % f.nqb, kvh = (u / f.nqb) % f.kv, row = u / (f.nqb * f.kv);
    const int64_t i0 = qb * BQ, qn = std::min(BQ, f.t - i0);
    std::fill(O, O + g * BQ * d, 0.f);
    std::fill(M, M + g * BQ, NEG_INF);
    std::fill(L, L + g * BQ, 0.f);
    for (int64_t kb = 0; kb <= qb * BQ / BK + (BQ - 1) / BK && kb * BK < f.t; ++kb) {
      if (!meets(f, row, qb, kb)) continue;
      const int64_t j0 = kb * BK, kn = std::min(BK, f.t - j0);
      load_keys(f, f.k, row, kvh, j0, kn, f.scale, Kt, nullptr);
      load_keys(f, f.v, row, kvh, j0, kn, 1.f, nullptr, Vb);
      const bool same = one_segment(f, row, qb, kb);
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t head = kvh * g + gi;
        gemm<false, true>(qn, BK, d, f.q + qrow(f, row, i0, head), ld, Kt, BK, S, BK);
        apply_mask(f, row, S, i0, qn, j0, kn, same);
        float *Og = O + gi * BQ * d, *Mg = M + gi * BQ, *Lg = L + gi * BQ;
        for (int64_t r = 0; r < qn; ++r) {
          float* s = S + r * BK;
          typename V::T mx = V::load(s);
          for (int64_t c = W; c < BK; c += W) mx = V::max(mx, V::load(s + c));
          const float m_new = std::max(Mg[r], V::hmax(mx));
          if (m_new == NEG_INF) {  // nothing seen yet in this row
            std::fill(s, s + BK, 0.f);
            continue;
          }
          const float alpha = std::exp(Mg[r] - m_new);  // 0 on the first block
          const typename V::T mv = V::set1(m_new);
          typename V::T sum = V::zero();
          for (int64_t c = 0; c < BK; c += W) {
            const typename V::T e = V::exp(V::sub(V::load(s + c), mv));
            V::store(s + c, e);
            sum = V::add(sum, e);
          }
          Lg[r] = Lg[r] * alpha + V::hsum(sum);
          Mg[r] = m_new;
          if (alpha != 1.f) {
            const typename V::T av = V::set1(alpha);
            for (int64_t e = 0; e < d; e += W) V::store(Og + r * d + e, V::mul(av, V::load(Og + r * d + e)));
          }
        }
        gemm<false, false>(qn, d, BK, S, BK, Vb, d, Og, d);
      }
    }
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t head = kvh * g + gi;
      for (int64_t r = 0; r < qn; ++r) {
        const float inv = 1.f / L[gi * BQ + r];
        float* dst = f.o + qrow(f, row, i0 + r, head);
        for (int64_t e = 0; e < d; ++e) dst[e] = O[(gi * BQ + r) * d + e] * inv;
        f.lse[(row * f.h + head) * f.t + i0 + r] = M[gi * BQ + r] + std::log(L[gi * BQ + r]);
      }
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------

void backward_units(const Problem& p, int64_t u0, int64_t u1) {
  const Flash& f = *reinterpret_cast<const Flash*>(p.x);
  const int64_t d = f.d, g = f.h / f.kv, ld = f.h * f.d, t = f.t;
  thread_local std::vector<float> buf;
  buf.resize(size_t(4 * d * BK + 2 * BQ * BK + 2 * BK * d + g * t));
  float *Kt = buf.data(), *Kb = Kt + d * BK, *Vt = Kb + BK * d, *Vb = Vt + d * BK, *P = Vb + BK * d, *dS = P + BQ * BK;
  float *dK = dS + BQ * BK, *dV = dK + BK * d, *D = dV + BK * d;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t kvh = u % f.kv, row = u / f.kv;
    for (int64_t gi = 0; gi < g; ++gi) {  // D = rowsum(dO * O); dQ = 0
      const int64_t head = kvh * g + gi;
      for (int64_t i = 0; i < t; ++i) {
        const float *a = f.dout + qrow(f, row, i, head), *o = f.out + qrow(f, row, i, head);
        typename V::T acc = V::zero();
        for (int64_t e = 0; e < d; e += W) acc = V::fma(V::load(a + e), V::load(o + e), acc);
        D[gi * t + i] = V::hsum(acc);
        std::fill(f.dq + qrow(f, row, i, head), f.dq + qrow(f, row, i, head) + d, 0.f);
      }
    }
    for (int64_t kb = 0; kb * BK < t; ++kb) {
      const int64_t j0 = kb * BK, kn = std::min(BK, t - j0);
      load_keys(f, f.k, row, kvh, j0, kn, f.scale, Kt, Kb);
      load_keys(f, f.v, row, kvh, j0, kn, 1.f, Vt, nullptr);
      std::fill(dK, dK + BK * d, 0.f);
      std::fill(dV, dV + BK * d, 0.f);
      for (int64_t qb = j0 / BQ; qb < f.nqb; ++qb) {
        if (!meets(f, row, qb, kb)) continue;
        const int64_t i0 = qb * BQ, qn = std::min(BQ, t - i0);
        const bool same = one_segment(f, row, qb, kb);
        for (int64_t gi = 0; gi < g; ++gi) {
          const int64_t head = kvh * g + gi;
          const float *Q = f.q + qrow(f, row, i0, head), *dO = f.dout + qrow(f, row, i0, head);
          const float* lse = f.lse_in + (row * f.h + head) * t + i0;
          gemm<false, true>(qn, BK, d, Q, ld, Kt, BK, P, BK);  // scores
          apply_mask(f, row, P, i0, qn, j0, kn, same);
          for (int64_t r = 0; r < qn; ++r) {
            const typename V::T l = V::set1(lse[r]);
            for (int64_t c = 0; c < BK; c += W) V::store(P + r * BK + c, V::exp(V::sub(V::load(P + r * BK + c), l)));
          }
          gemm<true, false>(BK, d, qn, P, BK, dO, ld, dV, d);       // dV += P^T dO
          gemm<false, true>(qn, BK, d, dO, ld, Vt, BK, dS, BK);     // dP = dO V^T
          for (int64_t r = 0; r < qn; ++r) {                         // dS = P (dP - D)
            const typename V::T dr = V::set1(D[gi * t + i0 + r]);
            for (int64_t c = 0; c < BK; c += W)
              V::store(dS + r * BK + c, V::mul(V::load(P + r * BK + c), V::sub(V::load(dS + r * BK + c), dr)));
          }
          gemm<true, false>(BK, d, qn, dS, BK, Q, ld, dK, d);       // dK += dS^T Q (times scale below)
          // dQ += dS K scale (Kt holds K scale transposed; Kb plain, so scale the product's rows).
          gemm<false, false>(qn, d, BK, dS, BK, Kb, d, f.dq + qrow(f, row, i0, head), ld);
        }
      }
      for (int64_t c = 0; c < kn; ++c) {
        float *dk = f.dk + krow(f, row, j0 + c, kvh), *dv = f.dv + krow(f, row, j0 + c, kvh);
        for (int64_t e = 0; e < d; ++e) dk[e] = dK[c * d + e] * f.scale, dv[e] = dV[c * d + e];
      }
    }
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < t; ++i) {
        float* x = f.dq + qrow(f, row, i, kvh * g + gi);
        for (int64_t e = 0; e < d; ++e) x[e] *= f.scale;
      }
  }
}

// ---- FFI ----------------------------------------------------------------------------------------

ffi::Error setup(Flash& f, ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> vd,
                 ffi::Span<const int64_t> sd, const int32_t* seg) {
  bool ok = kd[0] == qd[0] && kd[1] == qd[1] && kd[3] == qd[3] && kd[2] > 0 && qd[2] % kd[2] == 0 && sd[0] == qd[0] &&
            sd[1] == qd[1] && qd[3] % W == 0 && qd[2] / kd[2] <= 64;
  for (int i = 0; i < 4; ++i) ok = ok && vd[i] == kd[i];
  if (!ok) return ffi::Error::InvalidArgument("flash_attention: q [b,t,h,d], k, v [b,t,kv,d], seg [b,t] do not agree");
  f.b = qd[0], f.t = qd[1], f.h = qd[2], f.kv = kd[2], f.d = qd[3], f.seg = seg;
  f.scale = 1.f / std::sqrt(float(f.d));
  f.nqb = (f.t + BQ - 1) / BQ;
  static_assert(BQ == BK, "segment ranges are kept per block of BQ = BK positions");
  f.smin.assign(size_t(f.b * f.nqb), std::numeric_limits<int32_t>::max());
  f.smax.assign(size_t(f.b * f.nqb), std::numeric_limits<int32_t>::min());
  for (int64_t r = 0; r < f.b; ++r)
    for (int64_t i = 0; i < f.t; ++i) {
      const int64_t blk = r * f.nqb + i / BQ;
      f.smin[blk] = std::min(f.smin[blk], seg[r * f.t + i]);
      f.smax[blk] = std::max(f.smax[blk], seg[r * f.t + i]);
    }
  return ffi::Error::Success();
}

void run(Flash& f, RangeFn fn, int64_t units, int64_t flops) {
  Problem p{};
  p.x = reinterpret_cast<const float*>(&f);
  p.out_n = units;
  parallel_for(p, fn, flops, 1);
}

ffi::Error FlashForward(ffi::Buffer<ffi::F32, 4> q, ffi::Buffer<ffi::F32, 4> k, ffi::Buffer<ffi::F32, 4> v,
                        ffi::Buffer<ffi::S32, 2> seg, ffi::ResultBuffer<ffi::F32, 4> out,
                        ffi::ResultBuffer<ffi::F32, 3> lse) {
  Flash f{q.typed_data(), k.typed_data(), v.typed_data()};
  if (auto e = setup(f, q.dimensions(), k.dimensions(), v.dimensions(), seg.dimensions(), seg.typed_data()); e.failure())
    return e;
  f.o = out->typed_data(), f.lse = lse->typed_data();
  run(f, forward_units, f.b * f.kv * f.nqb, 2 * f.b * f.h * f.t * f.t * f.d);
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::Buffer<ffi::F32, 4> q, ffi::Buffer<ffi::F32, 4> k, ffi::Buffer<ffi::F32, 4> v,
                         ffi::Buffer<ffi::S32, 2> seg, ffi::Buffer<ffi::F32, 4> out, ffi::Buffer<ffi::F32, 3> lse,
                         ffi::Buffer<ffi::F32, 4> dout, ffi::ResultBuffer<ffi::F32, 4> dq,
                         ffi::ResultBuffer<ffi::F32, 4> dk, ffi::ResultBuffer<ffi::F32, 4> dv) {
  Flash f{q.typed_data(), k.typed_data(), v.typed_data()};
  if (auto e = setup(f, q.dimensions(), k.dimensions(), v.dimensions(), seg.dimensions(), seg.typed_data()); e.failure())
    return e;
  f.out = out.typed_data(), f.lse_in = lse.typed_data(), f.dout = dout.typed_data();
  f.dq = dq->typed_data(), f.dk = dk->typed_data(), f.dv = dv->typed_data();
  run(f, backward_units, f.b * f.kv, 5 * f.b * f.h * f.t * f.t * f.d);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_flash_forward, FlashForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::S32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_flash_backward, FlashBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::S32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>());
