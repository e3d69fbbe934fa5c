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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---- vector abstraction: W float lanes, loads of W int8 / W packed-int4 bytes ----------------

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  // In a register: a value used by several FMAs is loaded once, not folded into each of them.
  static void keep(T& a) { __asm__("" : "+v"(a)); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static float hsum(T a) { return _mm512_reduce_add_ps(a); }
  static T i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // The first n < W elements, the rest zero (int4: the rest's values are -8; their x is zero).
  static T loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
  static T i8n(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(__mmask16((1u << n) - 1), p)));
  }
  static void u4n(const uint8_t* p, int n, T& lo, T& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(__mmask16((1u << n) - 1), p));
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
  }
  static void u4(const uint8_t* p, T& lo, T& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
  }
};
#define JAXLLAMA_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static void keep(T& a) { __asm__("" : "+x"(a)); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static float hsum(T a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void u4(const uint8_t* p, T& lo, T& hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i eight = _mm256_set1_epi32(8);
    lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
    hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
  }
  static T loadn(const float* p, int n) {
    alignas(32) float b[W] = {};
    std::memcpy(b, p, n * sizeof(float));
    return load(b);
  }
  static T i8n(const int8_t* p, int n) {
    int8_t b[W] = {};
    std::memcpy(b, p, n);
    return i8(b);
  }
  static void u4n(const uint8_t* p, int n, T& lo, T& hi) {
    uint8_t b[W] = {};
    std::memcpy(b, p, n);
    u4(b, lo, hi);
  }
};
#define JAXLLAMA_ISA "avx2"
#else
// Plain C++: fixed-size arrays the compiler can vectorize (NEON, SSE).
struct V {
  static constexpr int W = 8;
  struct T { float v[W]; };
  static T zero() { T r; for (int i = 0; i < W; ++i) r.v[i] = 0.f; return r; }
  static void keep(T&) {}
  static T load(const float* p) { T r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
  static T set1(float s) { T r; for (int i = 0; i < W; ++i) r.v[i] = s; return r; }
  static T fma(T a, T b, T c) { for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static T mul(T a, T b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
  static float hsum(T a) { float s = 0.f; for (int i = 0; i < W; ++i) s += a.v[i]; return s; }
  static T i8(const int8_t* p) { T r; for (int i = 0; i < W; ++i) r.v[i] = float(p[i]); return r; }
  static void u4(const uint8_t* p, T& lo, T& hi) {
    for (int i = 0; i < W; ++i) {
      lo.v[i] = float(int(p[i] & 15) - 8);
      hi.v[i] = float(int(p[i] >> 4) - 8);
    }
  }
  static T loadn(const float* p, int n) { T r = zero(); for (int i = 0; i < n; ++i) r.v[i] = p[i]; return r; }
  static T i8n(const int8_t* p, int n) { T r = zero(); for (int i = 0; i < n; ++i) r.v[i] = float(p[i]); return r; }
  static void u4n(const uint8_t* p, int n, T& lo, T& hi) {
    uint8_t b[W] = {};
    for (int i = 0; i < n; ++i) b[i] = p[i];
    u4(b, lo, hi);
  }
};
#define JAXLLAMA_ISA "generic"
#endif

constexpr int W = V::W;

// Software prefetch of the weights 4 blocks ahead into L2 (prefetcht1). Measured on one core
// (int8, a row of x, the 135M matrices from memory): no prefetch 7.5 GB/s, one block ahead into
// L1 9-10, 2-8 blocks ahead into L2 15-15.5.
#ifndef JAXLLAMA_PF_MUL
#define JAXLLAMA_PF_MUL 4
#endif
#ifndef JAXLLAMA_PF_HINT
#define JAXLLAMA_PF_HINT 2
#endif
#define JAXLLAMA_PREFETCH(ptr, block) __builtin_prefetch((ptr) + JAXLLAMA_PF_MUL * (block), 0, JAXLLAMA_PF_HINT)
constexpr int kMaxRB = 8;  // rows of x per pass
#ifndef JAXLLAMA_CHUNK_BYTES
#define JAXLLAMA_CHUNK_BYTES (64 << 10)
#endif
constexpr int64_t kChunkBytes = JAXLLAMA_CHUNK_BYTES;  // least work worth another thread

struct Problem {
  const float* x;      // [rows, in]
  const uint8_t* q;    // [out, in] int8 or [out, in/2] packed int4, as bytes
  const float* scale;  // [out, groups]
  float* out;          // [rows, out]
  int64_t rows, in, out_n, groups, qstride;
  bool int4;
  // int4 on AVX-512 (see block4): x permuted to the order the nibbles are unpacked in,
  // [rows, nchunk, 8, 16]; how a chunk's lanes find their group's scale.
  const float* xp = nullptr;
  int64_t nchunk = 0;
  int smode = 0;  // 0: one scale per row; 1: 64 / (g/2) groups per chunk; 2: (g/2) % 64 == 0
  int32_t sidx[16] = {};
};

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

// Chunks of output rows shared by the caller and the workers. Held by shared_ptr: a worker that
// looks after the caller has returned finds no chunk left and touches nothing else.
struct Shared {
  Problem p;
  int64_t chunk, nchunks;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      run_range(p, c * chunk, std::min(p.out_n, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void relax() {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_pause();
#endif
}

// Worker threads of our own (one per CPU but the caller's). Not XLA's intra-op pool: a task
// scheduled there started ~280 us later (measured, 576x1536 int8 matvecs: the pool's threads
// sleep between ops), longer than most of these products take. After a job a worker spins for
// kSpin, which covers the gaps between one decoding step's matmuls, then sleeps until the next
// job (whose caller does not wait for it). Not sched_yield: on a loaded machine a yield gives
// the CPU away for a whole time slice, and the worker then missed most jobs.
constexpr auto kSpin = std::chrono::milliseconds(2);
class Workers {
 public:
  static Workers& get() {
    static Workers* w = new Workers();  // never destroyed: its threads outlive static destructors
    return *w;
  }
  int count() const { return int(threads_.size()); }

  // Runs sh on the caller and the workers; returns when every chunk is done. A second caller
  // while a job runs (XLA running several devices' programs at once) works alone.
  void run(const std::shared_ptr<Shared>& sh) {
    bool idle = false;
    const bool mine = !threads_.empty() && busy_.compare_exchange_strong(idle, true, std::memory_order_acquire);
    if (mine) {
      {
        std::lock_guard<std::mutex> lk(m_);
        job_ = sh;
        gen_.fetch_add(1, std::memory_order_release);
      }
      if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    }
    sh->work();
    // The chunks left are running on workers (a chunk is short: spin).
    while (sh->done.load(std::memory_order_acquire) < sh->nchunks) relax();
    if (mine) {
      std::lock_guard<std::mutex> lk(m_);
      job_.reset();
      busy_.store(false, std::memory_order_release);
    }
  }

 private:
  Workers() {
    int n = int(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    if (const char* e = std::getenv("JAXLLAMA_KERNEL_THREADS")) n = std::atoi(e);
    for (int i = 0; i + 1 < n; ++i) {
      threads_.emplace_back([this] { loop(); });
      threads_.back().detach();
    }
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t g;
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++spins) {
        if ((spins & 255) || std::chrono::steady_clock::now() - start < kSpin) {
          relax();
        } else {
          std::unique_lock<std::mutex> lk(m_);
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      seen = g;
      std::shared_ptr<Shared> sh;
      {
        std::lock_guard<std::mutex> lk(m_);
        sh = job_;
      }
      if (sh) sh->work();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Shared> job_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> busy_{false};
};

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
  // Work per chunk: at least kChunkBytes of weights (more rows of x make each byte dearer), so
  // small matrices run on the calling thread alone; otherwise a few chunks per thread, for balance.
  Workers& workers = Workers::get();
  const int64_t threads = workers.count() + 1;
  const int64_t cost = out_n * qstride * std::min<int64_t>(rows, 8);
  int64_t nchunks = threads > 1 ? std::min<int64_t>(4 * threads, cost / kChunkBytes) : 1;
  nchunks = std::max<int64_t>(1, std::min<int64_t>(nchunks, (out_n + 3) / 4));
  if (nchunks == 1) {
    run_range(p, 0, out_n);
    return ffi::Error::Success();
  }
  auto sh = std::make_shared<Shared>();
  sh->p = p;
  sh->chunk = ((out_n + nchunks - 1) / nchunks + 3) / 4 * 4;
  sh->nchunks = (out_n + sh->chunk - 1) / sh->chunk;
  workers.run(sh);
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
