// float32 matrix products of a few rows (decoding) for XLA:CPU, called from JAX through the XLA FFI.
// See jaxllama/model/cpu_kernels.py for why (XLA:CPU's own reads the weights at a fraction of the
// memory bandwidth, on one core) and cpu_kernels.h for the vector type and the worker threads.
//
//   io: out[r, c] = sum_i x[r, i] * w[i, c]     w [in, out]: the model's kernels (Linear)
//   oi: out[r, o] = sum_i x[r, i] * w[o, i]     w [out, in]: a tied LM head (the embedding table)
//
// io splits the weight rows (inputs) over the threads, so each reads one contiguous block of the
// matrix, and sums into a [rows, out] partial of its own (added up by the caller): four weight rows
// at a time are multiplied into up to 4 rows of x, the outputs accumulating in L1; more rows of x
// go over blocks of 64 weight rows, which are then in L2 for the later passes. oi is cpu_kernels.cc's
// int8 dot-product tiling with float loads. Both are exact float32 FMAs: only the order of the sums
// differs from XLA's.

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllama_kernels;

// Weight rows ahead to prefetch (io reads four rows at a time, four streams).
#ifndef JAXLLAMA_IO_PF_ROWS
#define JAXLLAMA_IO_PF_ROWS 8
#endif

inline const float* weights(const Problem& p) { return reinterpret_cast<const float*>(p.q); }

// RB rows of x, columns [c0, c1) (whole vectors), weight rows [0, in) four at a time: the outputs
// accumulate in `out` (a segment of them stays in L1), each step reading four weight rows' segment
// (four contiguous streams, as many as oi reads) and multiplying them into every row of x.
template <int RB>
void io_segment(const Problem& p, float* out, int64_t r0, int64_t c0, int64_t c1, int64_t i0, int64_t in,
                bool zero = true) {
  const int64_t ld = p.qstride;
  const float* w = weights(p);
  float* y[RB];
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) {
    y[r] = out + (r0 + r) * p.out_n;
    xr[r] = p.x + (r0 + r) * p.in;
    if (zero)
      for (int64_t c = c0; c < c1; c += W) V::store(y[r] + c, V::zero());
  }
  int64_t i = i0;
  for (; i + 4 <= in; i += 4) {
    typename V::T b[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int k = 0; k < 4; ++k) b[r][k] = V::set1(xr[r][i + k]);
    const float* wi = w + i * ld;
    for (int64_t c = c0; c < c1; c += W) {
      typename V::T wv[4];
      for (int k = 0; k < 4; ++k) {
        if ((c * 4) % 64 == 0) __builtin_prefetch(wi + (k + JAXLLAMA_IO_PF_ROWS) * ld + c, 0, 2);
        wv[k] = V::load(wi + k * ld + c);
      }
      for (int r = 0; r < RB; ++r) {
        typename V::T acc = V::load(y[r] + c);
        for (int k = 0; k < 4; ++k) acc = V::fma(wv[k], b[r][k], acc);
        V::store(y[r] + c, acc);
      }
    }
  }
  for (; i < in; ++i) {
    const float* wi = w + i * ld;
    for (int r = 0; r < RB; ++r) {
      const typename V::T b = V::set1(xr[r][i]);
      for (int64_t c = c0; c < c1; c += W) V::store(y[r] + c, V::fma(V::load(wi + c), b, V::load(y[r] + c)));
    }
  }
}

// Columns past the last whole vector (a vocabulary of 32001, a test's odd sizes).
void io_tail(const Problem& p, int64_t r0, int64_t rb, int64_t c0, int64_t c1) {
  const float* w = weights(p);
  for (int64_t r = r0; r < r0 + rb; ++r)
    for (int64_t c = c0; c < c1; ++c) {
      float s = 0.f;
      for (int64_t i = 0; i < p.in; ++i) s += p.x[r * p.in + i] * w[i * p.qstride + c];
      p.out[r * p.out_n + c] = s;
    }
}

// Input rows split over the threads (each reads one contiguous block of the weights: split by
// columns, each thread's reads were strided, and one core reached ~11 GB/s instead of ~24), every
// part summing into its own [rows, out] partial, added up by the caller.
struct ISplit {
  const Problem* p;
  float* parts;
  int64_t per;  // input rows per part
};

void io_part(const Problem& q, int64_t part0, int64_t part1) {
  const ISplit& s = *reinterpret_cast<const ISplit*>(q.x);
  const Problem& p = *s.p;
  const int64_t cv = p.out_n / W * W;
  for (int64_t part = part0; part < part1; ++part) {
    const int64_t i0 = part * s.per, i1 = std::min(p.in, i0 + s.per);
    float* out = s.parts + part * p.rows * p.out_n;
    // Blocks of input rows, every pass of x rows over a block before the next (the block's weights
    // are then in L2 for the later passes).
    const int64_t blk = p.rows <= 4 ? i1 - i0 : 64;
    for (int64_t b0 = i0; b0 < i1; b0 += blk) {
      const int64_t b1 = std::min(i1, b0 + blk);
      for (int64_t r0 = 0, rb = 0; r0 < p.rows; r0 += rb) {
        rb = std::min<int64_t>(4, p.rows - r0);
        switch (rb) {
          case 1: io_segment<1>(p, out, r0, 0, cv, b0, b1, b0 == i0); break;
          case 2: io_segment<2>(p, out, r0, 0, cv, b0, b1, b0 == i0); break;
          case 3: io_segment<3>(p, out, r0, 0, cv, b0, b1, b0 == i0); break;
          default: io_segment<4>(p, out, r0, 0, cv, b0, b1, b0 == i0);
        }
      }
    }
  }
}

// Passes of 8, 4, 3, 2 or 1 rows (5 to 7 rows: 4, then the rest).
inline int64_t pass_rows(int64_t left) {
  int64_t rb = std::min<int64_t>(kMaxRB, left);
  return rb > 4 && rb < 8 ? 4 : rb;
}

template <int RB, int OB>
void oi_block(const Problem& p, int64_t r0, int64_t o0) {
  const int64_t in = p.in;
  typename V::T acc[RB][OB];
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) acc[r][o] = V::zero();
  const float* xr[RB];
  for (int r = 0; r < RB; ++r) xr[r] = p.x + (r0 + r) * in;
  const float* wo[OB];
  for (int o = 0; o < OB; ++o) wo[o] = weights(p) + (o0 + o) * p.qstride;
  auto step = [&](int64_t k, int n) {
    typename V::T w[OB];
    for (int o = 0; o < OB; ++o) {
      if (k % 16 == 0) JAXLLAMA_PREFETCH(wo[o] + k, OB * p.qstride);
      w[o] = n == W ? V::load(wo[o] + k) : V::loadn(wo[o] + k, n);
    }
    for (int r = 0; r < RB; ++r) {
      typename V::T xv = n == W ? V::load(xr[r] + k) : V::loadn(xr[r] + k, n);
      if (OB > 1) V::keep(xv);
      for (int o = 0; o < OB; ++o) acc[r][o] = V::fma(w[o], xv, acc[r][o]);
    }
  };
  int64_t k = 0;
  for (; k + W <= in; k += W) step(k, W);
  if (k < in) step(k, int(in - k));
  for (int r = 0; r < RB; ++r)
    for (int o = 0; o < OB; ++o) p.out[(r0 + r) * p.out_n + o0 + o] = V::hsum(acc[r][o]);
}

template <int RB>
void oi_rows(const Problem& p, int64_t r0, int64_t o0, int64_t o1) {
  constexpr int OB = RB <= 4 ? 4 : 2;
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) oi_block<RB, OB>(p, r0, o);
  for (; o < o1; ++o) oi_block<RB, 1>(p, r0, o);
}

// Output rows [o0, o1) in tiles of 16 (their weights stay in L1 while every pass of x rows reads them).
void oi_range(const Problem& p, int64_t o0, int64_t o1) {
  constexpr int64_t kTile = 16;
  for (int64_t t = o0; t < o1; t += kTile) {
    const int64_t t1 = std::min(o1, t + kTile);
    for (int64_t r0 = 0, rb = 0; r0 < p.rows; r0 += rb) {
      rb = pass_rows(p.rows - r0);
      switch (rb) {
        case 1: oi_rows<1>(p, r0, t, t1); break;
        case 2: oi_rows<2>(p, r0, t, t1); break;
        case 3: oi_rows<3>(p, r0, t, t1); break;
        case 4: oi_rows<4>(p, r0, t, t1); break;
        default: oi_rows<8>(p, r0, t, t1);
      }
    }
  }
}

template <bool IO>
ffi::Error FMatmul(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::F32, 2> w, ffi::ResultBuffer<ffi::F32, 2> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t rows = xd[0], in = xd[1], out_n = IO ? wd[1] : wd[0];
  if ((IO ? wd[0] : wd[1]) != in || out->dimensions()[0] != rows || out->dimensions()[1] != out_n)
    return ffi::Error::InvalidArgument("fmatmul: shapes of x, w and out do not agree");
  if (rows == 0 || out_n == 0) return ffi::Error::Success();
  Problem p{x.typed_data(), reinterpret_cast<const uint8_t*>(w.typed_data()), nullptr, out->typed_data(),
            rows, in, out_n, 1, IO ? out_n : in, false};
  if (IO) {
    const int64_t threads = Workers::get().count() + 1;
    const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(threads, 4 * in * out_n / kChunkBytes));
    std::vector<float> parts(nparts > 1 ? size_t(nparts * rows * out_n) : 0);
    ISplit sp{&p, nparts > 1 ? parts.data() : p.out, (in + nparts - 1) / nparts};
    Problem q = p;
    q.x = reinterpret_cast<const float*>(&sp);  // io_part's argument
    q.out_n = nparts;
    parallel_for(q, io_part, nparts * kChunkBytes, 1);
    const int64_t cv = out_n / W * W;
    if (nparts > 1) {
      float* o = p.out;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cv; ++c) {
          float acc = 0.f;
          for (int64_t part = 0; part < nparts; ++part) acc += parts[(part * rows + r) * out_n + c];
          o[r * out_n + c] = acc;
        }
    }
    if (cv < out_n) io_tail(p, 0, rows, cv, out_n);
    return ffi::Error::Success();
  }
  // Chunks of 4 output rows at least (more rows of x make each weight byte dearer).
  parallel_for(p, oi_range, 4 * in * out_n * std::min<int64_t>(rows, 8), 4);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_fmatmul_io, FMatmul<true>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_fmatmul_oi, FMatmul<false>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>());
