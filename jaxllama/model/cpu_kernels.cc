// Quantized matrix-vector products for XLA:CPU, called from JAX through the XLA FFI.
// See jaxllama/model/cpu_kernels.py for why this exists and the layout (jaxllama/model/quant.py).
//
//   out[r, o] = sum_i x[r, i] * value(q[o, i]) * scale[o, i / g]        (g = in / groups)
//
// int8: q [out, in] int8. int4: q [out, in/2] uint8, two values per byte stored as value + 8;
// within each group of g inputs byte j holds input j (low nibble) and input j + g/2 (high nibble).
//
// Each output row's weights are contiguous, so a block of OB output rows is read once, converted
// to float once, and applied to RB rows of x held in registers (RB x OB accumulators). Rows of x
// beyond RB are done by another pass over the same OB weight rows, which are then in L1. Output
// rows are split into chunks that worker threads (Workers) and the calling thread take from a
// shared counter (the caller only ever waits for chunks that are already running, so busy
// workers cannot deadlock it).
//
// Rounding: one scale per row is applied to the finished dot product (as quant.matmul's XLA
// path does); grouped scales multiply the converted weights (as quant.dequantize does) or, for
// int4 with few rows, a group's partial sum. Either way the result is the float reference's to
// float32 rounding; only the order of the sums differs.

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllama_kernels;

// OB output rows x RB rows of x, all `in` inputs. GROUPED: scales per group multiply the weights;
// otherwise one scale per output row multiplies the result. A span (a group, or the whole row)
// that is not a multiple of W ends with a partial vector (zero-filled loads).
template <int RB, int OB, bool INT4, bool GROUPED>
void block(const Problem& p, int64_t r0, int64_t o0) {
  const int64_t in = p.in, groups = p.groups, g = in / groups;
  typename V::T acc[RB][OB];
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) acc[r][o] = V::zero();
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = p.x + (r0 + r) * in;
  const uint8_t* qo[OB];
  const float* so[OB];
  for (int o = 0; o < OB; ++o) qo[o] = p.q + (o0 + o) * p.qstride, so[o] = p.scale + (o0 + o) * groups;

  // int8 with whole vectors in each group: one pass, the scale looked up per vector.
  if (!INT4 && GROUPED && g % W == 0) {
    const int64_t vpg = g / W;  // vectors per group
    for (int64_t gi = 0; gi < groups; ++gi) {
      typename V::T sg[OB];
      for (int o = 0; o < OB; ++o) sg[o] = V::set1(so[o][gi]);
      for (int64_t v = 0; v < vpg; ++v) {
        const int64_t k = (gi * vpg + v) * W;
        typename V::T w[OB];
        for (int o = 0; o < OB; ++o) {
          JAXLLAMA_PREFETCH(qo[o] + k, OB * p.qstride);  // the next block's row
          w[o] = V::mul(V::i8(reinterpret_cast<const int8_t*>(qo[o]) + k), sg[o]);
        }
        for (int r = 0; r < RB; ++r) {
          typename V::T xv = V::load(xr[r] + k);
          if (OB > 1) V::keep(xv);
          for (int o = 0; o < OB; ++o) acc[r][o] = V::fma(w[o], xv, acc[r][o]);
        }
      }
    }
  } else {
    // One group at a time when grouped (or int4, whose nibble order is per group); else one span.
    const int64_t span = (GROUPED || INT4) ? g : in;
    const int64_t nspan = in / span;
    for (int64_t s = 0; s < nspan; ++s) {
      const int64_t base = s * span;  // first input of this span
      typename V::T sg[OB];
      if (GROUPED)
        for (int o = 0; o < OB; ++o) sg[o] = V::set1(so[o][s]);
      if (!INT4) {
        auto step = [&](int64_t k, int n) {
          typename V::T w[OB];
          for (int o = 0; o < OB; ++o) {
            JAXLLAMA_PREFETCH(qo[o] + base + k, OB * p.qstride);
            const int8_t* src = reinterpret_cast<const int8_t*>(qo[o]) + base + k;
            w[o] = n == W ? V::i8(src) : V::i8n(src, n);
            if (GROUPED) w[o] = V::mul(w[o], sg[o]);
          }
          for (int r = 0; r < RB; ++r) {
            typename V::T xv = n == W ? V::load(xr[r] + base + k) : V::loadn(xr[r] + base + k, n);
            if (OB > 1) V::keep(xv);
            for (int o = 0; o < OB; ++o) acc[r][o] = V::fma(w[o], xv, acc[r][o]);
          }
        };
        int64_t k = 0;
        for (; k + W <= span; k += W) step(k, W);
        if (k < span) step(k, int(span - k));
      } else {
        const int64_t half = span / 2, qb = base / 2;  // bytes of this group: [qb, qb + half)
        auto step = [&](int64_t j, int n) {
          typename V::T lo[OB], hi[OB];
          for (int o = 0; o < OB; ++o) {
            JAXLLAMA_PREFETCH(qo[o] + qb + j, OB * p.qstride);
            if (n == W) V::u4(qo[o] + qb + j, lo[o], hi[o]);
            else V::u4n(qo[o] + qb + j, n, lo[o], hi[o]);
            if (GROUPED) lo[o] = V::mul(lo[o], sg[o]), hi[o] = V::mul(hi[o], sg[o]);
          }
          for (int r = 0; r < RB; ++r) {
            const float* xs = xr[r] + base + j;
            typename V::T xl = n == W ? V::load(xs) : V::loadn(xs, n);
            typename V::T xh = n == W ? V::load(xs + half) : V::loadn(xs + half, n);
            if (OB > 1) V::keep(xl), V::keep(xh);
            for (int o = 0; o < OB; ++o) acc[r][o] = V::fma(hi[o], xh, V::fma(lo[o], xl, acc[r][o]));
          }
        };
        int64_t j = 0;
        for (; j + W <= half; j += W) step(j, W);
        if (j < half) step(j, int(half - j));
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) {
      float y = V::hsum(acc[r][o]);
      if (!GROUPED) y *= so[o][0];
      p.out[(r0 + r) * p.out_n + o0 + o] = y;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// int4, AVX-512: a 64-byte chunk of a weight row (128 values) is unpacked 32-bit lane by lane,
// with shifts and no shuffles (converting the bytes to 32 bits first costs twice as much). Lane l of
// unpacked vector n is the byte 4l + n/2 of the chunk (low nibble for even n), so x is permuted
// once per call into that order (Problem::xp, zero past the row's end). Every lane's bytes are in
// one group (g/2 % 4 == 0), so grouped scales are a per-lane vector per chunk: they multiply a
// chunk's sum (CHUNKSUM, few accumulators) or the unpacked weights.
template <int RB, int OB, bool GROUPED>
void block4(const Problem& p, int64_t r0, int64_t o0) {
  constexpr bool CHUNKSUM = GROUPED && RB * OB <= 8;
  const int64_t L = p.qstride, nchunk = p.nchunk, full = L / 64, groups = p.groups;
  const int64_t h = (p.in / groups) / 2;  // bytes per group
  __m512 acc[RB][OB];
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) acc[r][o] = _mm512_setzero_ps();
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = p.xp + (r0 + r) * nchunk * 128;
  const uint8_t* qo[OB];
  const float* so[OB];
  for (int o = 0; o < OB; ++o) qo[o] = p.q + (o0 + o) * L, so[o] = p.scale + (o0 + o) * groups;
  // Two ways to unpack, the same values: MAGIC (few rows: fewer shifts, an extra float op):
  // nibble | 0x4B000000 is the float 2^23 + nibble, minus 2^23 + 8 the value (exactly); else
  // (more rows: the float unit is busy with their FMAs) after XOR 0x8, nibble n shifted to the
  // top and arithmetically back is the value (the stored value + 8 read as 4-bit two's complement).
  constexpr bool MAGIC = RB <= 2;
  const __m512i flip = _mm512_set1_epi8(char(0x88));
  const __m512i nib = _mm512_set1_epi32(15), magic = _mm512_set1_epi32(0x4B000000);
  const __m512 bias = _mm512_set1_ps(8388616.0f);
  const __m512i sidx = _mm512_loadu_si512(p.sidx);
  const int64_t gpc = p.smode == 1 ? 64 / h : 0;
  for (int64_t c = 0; c < nchunk; ++c) {
    const __mmask64 m = c < full ? ~__mmask64(0) : (__mmask64(1) << (L - 64 * c)) - 1;
    __m512i z[OB];
    __m512 sc[OB];
    for (int o = 0; o < OB; ++o) {
      JAXLLAMA_PREFETCH(qo[o] + 64 * c, OB * L);
      z[o] = _mm512_maskz_loadu_epi8(m, qo[o] + 64 * c);
      if (!MAGIC) z[o] = _mm512_xor_si512(z[o], flip);
      if (GROUPED) {
        if (p.smode == 1) {
          const int64_t g0 = c * gpc, n = std::min<int64_t>(gpc, groups - g0);
          sc[o] = _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), so[o] + g0));
        } else {
          sc[o] = _mm512_set1_ps(so[o][(64 * c) / h]);
        }
      }
    }
    __m512 t[CHUNKSUM ? RB : 1][CHUNKSUM ? OB : 1];
    if (CHUNKSUM)
      for (int r = 0; r < RB; ++r)
        for (int o = 0; o < OB; ++o) t[r][o] = _mm512_setzero_ps();
    const int64_t xoff = c * 128;
#define JAXLLAMA_NIBBLE(n)                                                                     \
    {                                                                                          \
      __m512 w[OB];                                                                            \
      for (int o = 0; o < OB; ++o) {                                                           \
        if (MAGIC) {                                                                           \
          const __m512i v = (n) == 0 ? z[o] : _mm512_srli_epi32(z[o], 4 * (n));                \
          w[o] = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, nib, magic, 0xEA)), bias); \
        } else {                                                                               \
          const __m512i v = (n) == 7 ? _mm512_srai_epi32(z[o], 28)                             \
                                     : _mm512_srai_epi32(_mm512_slli_epi32(z[o], 28 - 4 * (n)), 28); \
          w[o] = _mm512_cvtepi32_ps(v);                                                        \
        }                                                                                      \
        if (GROUPED && !CHUNKSUM) w[o] = _mm512_mul_ps(w[o], sc[o]);                           \
      }                                                                                        \
      for (int r = 0; r < RB; ++r) {                                                           \
        __m512 xv = _mm512_loadu_ps(xr[r] + xoff + 16 * (n));                                  \
        if (OB > 1) V::keep(xv);                                                               \
        for (int o = 0; o < OB; ++o) {                                                         \
          if (CHUNKSUM) t[r][o] = _mm512_fmadd_ps(w[o], xv, t[r][o]);                          \
          else acc[r][o] = _mm512_fmadd_ps(w[o], xv, acc[r][o]);                               \
        }                                                                                      \
      }                                                                                        \
    }
    JAXLLAMA_NIBBLE(0) JAXLLAMA_NIBBLE(1) JAXLLAMA_NIBBLE(2) JAXLLAMA_NIBBLE(3)
    JAXLLAMA_NIBBLE(4) JAXLLAMA_NIBBLE(5) JAXLLAMA_NIBBLE(6) JAXLLAMA_NIBBLE(7)
#undef JAXLLAMA_NIBBLE
    if (CHUNKSUM)
      for (int r = 0; r < RB; ++r)
        for (int o = 0; o < OB; ++o) acc[r][o] = _mm512_fmadd_ps(t[r][o], sc[o], acc[r][o]);
  }
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) {
      float y = _mm512_reduce_add_ps(acc[r][o]);
      if (!GROUPED) y *= so[o][0];
      p.out[(r0 + r) * p.out_n + o0 + o] = y;
    }
}

// Whether block4 takes this int4 problem, and its permuted x and scale lanes if so.
bool prepare4(Problem& p, std::vector<float>& xp) {
  const int64_t g = p.in / p.groups, h = g / 2, L = p.qstride;
  if (p.groups == 1) p.smode = 0;
  else if (h % 4 == 0 && 64 % h == 0) p.smode = 1;
  else if (h % 64 == 0) p.smode = 2;
  else return false;
  p.nchunk = (L + 63) / 64;
  xp.assign(size_t(p.rows * p.nchunk * 128), 0.f);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * p.in;
    float* d = xp.data() + r * p.nchunk * 128;
    for (int64_t c = 0; c < p.nchunk; ++c)
      for (int n = 0; n < 8; ++n)
        for (int l = 0; l < 16; ++l) {
          const int64_t b = 64 * c + 4 * l + n / 2;  // byte of the row
          if (b < L) d[c * 128 + n * 16 + l] = x[(b / h) * g + b % h + (n & 1) * h];
        }
  }
  for (int l = 0; l < 16; ++l) p.sidx[l] = p.smode == 1 ? int32_t((4 * l) / h) : 0;
  p.xp = xp.data();
  return true;
}
#define JAXLLAMA_BLOCK4 1
#endif

// Output rows per block for RB rows of x: RB * OB accumulators, at most 16 (AVX-512 has 32
// registers; the weights, their scales and an x vector need the rest).
constexpr int ob_for(int rb) { return rb <= 4 ? 4 : 2; }
// block4: 2 output rows from 3 rows of x, so that its grouped scales apply to chunk sums
// (RB * OB <= 8 accumulators more), +8% at 3-4 rows.
constexpr int ob4_for(int rb) { return rb <= 2 ? 4 : 2; }

template <int RB, bool INT4, bool GROUPED>
void rows_pass(const Problem& p, int64_t r0, int64_t o_begin, int64_t o_end) {
  constexpr int OB = ob_for(RB);
  int64_t o = o_begin;
#ifdef JAXLLAMA_BLOCK4
  if (INT4 && p.xp) {
    constexpr int OB4 = ob4_for(RB);
    for (; o + OB4 <= o_end; o += OB4) block4<RB, OB4, GROUPED>(p, r0, o);
    for (; o < o_end; ++o) block4<RB, 1, GROUPED>(p, r0, o);
    return;
  }
#endif
  for (; o + OB <= o_end; o += OB) block<RB, OB, INT4, GROUPED>(p, r0, o);
  for (; o < o_end; ++o) block<RB, 1, INT4, GROUPED>(p, r0, o);
}

template <bool INT4, bool GROUPED>
void rows_dispatch(const Problem& p, int rb, int64_t r0, int64_t o0, int64_t o1) {
  switch (rb) {
    case 1: return rows_pass<1, INT4, GROUPED>(p, r0, o0, o1);
    case 2: return rows_pass<2, INT4, GROUPED>(p, r0, o0, o1);
    case 3: return rows_pass<3, INT4, GROUPED>(p, r0, o0, o1);
    case 4: return rows_pass<4, INT4, GROUPED>(p, r0, o0, o1);
    default: return rows_pass<8, INT4, GROUPED>(p, r0, o0, o1);
  }
}

// Output rows [o0, o1): a few at a time (so their weights stay in L1), every pass of x rows each.
// Many rows (prefill): x in blocks of ~256 KiB, so a block stays in L2 while every tile of the
// weights passes over it (the weights are read once per block; at that many rows the FMAs, not
// the weight bytes, are the cost). Without the blocks, 512 rows of 576 took 4x as long as 256.
void run_range(const Problem& p, int64_t o0, int64_t o1) {
  constexpr int64_t kTile = 16;
  const int64_t xrow = p.xp ? p.nchunk * 128 : p.in;  // floats of x a row
  const int64_t rblk = std::max<int64_t>(kMaxRB, (256 << 10) / (4 * xrow) / kMaxRB * kMaxRB);
  for (int64_t b0 = 0; b0 < p.rows; b0 += rblk) {
  const int64_t b1 = std::min(p.rows, b0 + rblk);
  for (int64_t t = o0; t < o1; t += kTile) {
    const int64_t t1 = std::min(o1, t + kTile);
    // Passes of 8, 4, 3, 2 or 1 rows (5 to 7 rows: 4, then the rest).
    for (int64_t r0 = b0, rb = 0; r0 < b1; r0 += rb) {
      rb = std::min<int64_t>(kMaxRB, b1 - r0);
      if (rb > 4 && rb < 8) rb = 4;
      const bool grouped = p.groups > 1;
      if (p.int4) {
        grouped ? rows_dispatch<true, true>(p, int(rb), r0, t, t1) : rows_dispatch<true, false>(p, int(rb), r0, t, t1);
      } else {
        grouped ? rows_dispatch<false, true>(p, int(rb), r0, t, t1) : rows_dispatch<false, false>(p, int(rb), r0, t, t1);
      }
    }
  }
  }
}

ffi::Error Compute(const float* x, const uint8_t* q, const float* scale, float* out, int64_t rows, int64_t in,
                   int64_t out_n, int64_t groups, int64_t qstride, bool int4) {
  if (groups <= 0 || in % groups) return ffi::Error::InvalidArgument("qmatmul: groups must divide in");
  if (int4 && ((in / groups) % 2)) return ffi::Error::InvalidArgument("qmatmul: int4 groups must be even");
  Problem p{x, q, scale, out, rows, in, out_n, groups, qstride, int4};
  if (rows == 0 || out_n == 0) return ffi::Error::Success();
  std::vector<float> xp;
#ifdef JAXLLAMA_BLOCK4
  if (int4) prepare4(p, xp);
#endif
  // More rows of x make each weight byte dearer; chunks of 4 output rows at least.
  parallel_for(p, run_range, out_n * qstride * std::min<int64_t>(rows, 8), 4);
  return ffi::Error::Success();
}

template <ffi::DataType QT>
ffi::Error QMatmul(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<QT, 2> q,
                   ffi::Buffer<ffi::F32, 2> scale, ffi::ResultBuffer<ffi::F32, 2> out) {
  constexpr bool int4 = QT == ffi::U8;
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  const int64_t rows = xd[0], in = xd[1], out_n = qd[0];
  if (qd[1] * (int4 ? 2 : 1) != in || sd[0] != out_n || out->dimensions()[0] != rows ||
      out->dimensions()[1] != out_n)
    return ffi::Error::InvalidArgument("qmatmul: shapes of x, q, scale and out do not agree");
  return Compute(x.typed_data(), reinterpret_cast<const uint8_t*>(q.untyped_data()), scale.typed_data(),
                 out->typed_data(), rows, in, out_n, sd[1], qd[1], int4);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_qmatmul_int8, QMatmul<ffi::S8>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::S8>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_qmatmul_int4, QMatmul<ffi::U8>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::U8>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>());

extern "C" const char* jaxllama_qmatmul_isa() { return JAXLLAMA_ISA; }
