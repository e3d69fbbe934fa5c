// One decode step's attention over a KV cache, float32, for XLA:CPU through the XLA FFI (see
// jaxllama/model/cpu_kernels.py and jaxllama.model.attention.cached_attention, whose result it is).
//
//   q [b, kv, g, d]: the step's g query heads of each KV head; caches [b, kv, s, d] (heads-major);
//   n [b] int32: slots 0..n-1 of row b are its earlier positions (later slots are masked);
//   k, v [b, kv, d]: the step's own key and value (attended to, not yet in the cache);
//   out [b, kv, g, d] = softmax(q . [K[:n]; k] / sqrt(d)) [V[:n]; v]
//
// An int8 cache (jaxllama.model.quant.quantize_kv): int8 values [b, kv, s, d] and float32 scales
// [b, kv, s, 1] for each of K and V; a slot's scale multiplies its dot product (K) or its weight (V).
//
// Each (row, KV head) reads its keys once for all g query heads, then its values once: the cache
// is streamed at memory speed on every core (XLA ran these small batched products at ~6 GB/s on
// one core: at batch 16, a quarter of the 135M shape's step).

#include <cmath>
#include <type_traits>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxllama_kernels;

constexpr int kMaxG = 16;  // query heads per KV head handled in registers' reach (more: in groups)

struct Attn {
  const float *q, *kc, *vc, *k, *v;
  const int8_t *kq = nullptr, *vq = nullptr;  // int8 cache: values, and kc / vc are the scales
  const int32_t* n = nullptr;
  float* out = nullptr;
  int64_t kv = 0, g = 0, s = 0, d = 0;
  float scale = 1.f;
};

inline float dot(const float* a, const float* b, int64_t d) {
  typename V::T acc = V::zero();
  int64_t i = 0;
  for (; i + W <= d; i += W) acc = V::fma(V::load(a + i), V::load(b + i), acc);
  float s = V::hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline float dot(const float* a, const int8_t* b, int64_t d) {
  typename V::T acc = V::zero();
  int64_t i = 0;
  for (; i + W <= d; i += W) acc = V::fma(V::load(a + i), V::i8(b + i), acc);
  float s = V::hsum(acc);
  for (; i < d; ++i) s += a[i] * float(b[i]);
  return s;
}

inline void axpy(float p, const int8_t* x, float* y, int64_t d) {
  const typename V::T pv = V::set1(p);
  int64_t i = 0;
  for (; i + W <= d; i += W) V::store(y + i, V::fma(pv, V::i8(x + i), V::load(y + i)));
  for (; i < d; ++i) y[i] += p * float(x[i]);
}

inline void axpy(float p, const float* x, float* y, int64_t d) {
  const typename V::T pv = V::set1(p);
  int64_t i = 0;
  for (; i + W <= d; i += W) V::store(y + i, V::fma(pv, V::load(x + i), V::load(y + i)));
  for (; i < d; ++i) y[i] += p * x[i];
}

// Query heads [g0, g0 + gn) of unit u = (row, KV head); T: the cache's values (float or int8).
template <typename T>
void unit(const Attn& a, int64_t u, int64_t g0, int64_t gn, std::vector<float>& sc) {
  constexpr bool INT8 = std::is_same<T, int8_t>::value;
  const int64_t row = u / a.kv, d = a.d, s = a.s;
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(a.n[row], s));
  const T* K = reinterpret_cast<const T*>(INT8 ? static_cast<const void*>(a.kq) : a.kc) + u * s * d;
  const T* Vc = reinterpret_cast<const T*>(INT8 ? static_cast<const void*>(a.vq) : a.vc) + u * s * d;
  const float* ks = a.kc + u * s;  // int8: the scales
  const float* vs = a.vc + u * s;
  const float* q = a.q + (u * a.g + g0) * d;
  sc.resize(size_t(gn * (n + 1)));
  float mx[kMaxG], sum[kMaxG];
  for (int64_t r = 0; r < gn; ++r) {
    sc[r * (n + 1) + n] = dot(q + r * d, a.k + u * d, d) * a.scale;
    mx[r] = sc[r * (n + 1) + n];
  }
  for (int64_t j = 0; j < n; ++j) {
    if (j + 4 < n) __builtin_prefetch(K + (j + 4) * d, 0, 2);
    for (int64_t r = 0; r < gn; ++r) {
      const float x = dot(q + r * d, K + j * d, d) * (INT8 ? a.scale * ks[j] : a.scale);
      sc[r * (n + 1) + j] = x;
      mx[r] = std::max(mx[r], x);
    }
  }
  for (int64_t r = 0; r < gn; ++r) {
    float t = 0.f;
    for (int64_t j = 0; j <= n; ++j) t += sc[r * (n + 1) + j] = std::exp(sc[r * (n + 1) + j] - mx[r]);
    sum[r] = t;
  }
  float* o = a.out + (u * a.g + g0) * d;
  for (int64_t r = 0; r < gn; ++r) {
    std::fill(o + r * d, o + (r + 1) * d, 0.f);
    axpy(sc[r * (n + 1) + n], a.v + u * d, o + r * d, d);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (j + 4 < n) __builtin_prefetch(Vc + (j + 4) * d, 0, 2);
    for (int64_t r = 0; r < gn; ++r) axpy(sc[r * (n + 1) + j] * (INT8 ? vs[j] : 1.f), Vc + j * d, o + r * d, d);
  }
  for (int64_t r = 0; r < gn; ++r) {
    const float inv = 1.f / sum[r];
    for (int64_t i = 0; i < d; ++i) o[r * d + i] *= inv;
  }
}

template <typename T>
void units(const Problem& p, int64_t u0, int64_t u1) {
  const Attn& a = *reinterpret_cast<const Attn*>(p.x);
  std::vector<float> sc;
  for (int64_t u = u0; u < u1; ++u)
    for (int64_t g0 = 0; g0 < a.g; g0 += kMaxG) unit<T>(a, u, g0, std::min<int64_t>(kMaxG, a.g - g0), sc);
}

// Shapes: q [b, kv, g, d]; the caches' values cd; their scales (int8) [b, kv, s, 1]; n [b]; k, v [b, kv, d].
bool shapes_agree(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> cd, ffi::Span<const int64_t> vd,
                  int64_t nb, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> nvd) {
  bool ok = cd[0] == qd[0] && cd[1] == qd[1] && cd[3] == qd[3] && nb == qd[0] && kd[0] == qd[0] && kd[1] == qd[1] &&
            kd[2] == qd[3];
  for (int i = 0; i < 4; ++i) ok = ok && vd[i] == cd[i];
  for (int i = 0; i < 3; ++i) ok = ok && nvd[i] == kd[i];
  return ok;
}

template <typename T>
void run(Attn& a, int64_t b) {
  Problem p{};
  p.x = reinterpret_cast<const float*>(&a);  // units' argument
  p.out_n = b * a.kv;
  parallel_for(p, units<T>, 2 * int64_t(sizeof(T)) * b * a.kv * a.s * a.d, 1);
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32, 4> q, ffi::Buffer<ffi::F32, 4> kc, ffi::Buffer<ffi::F32, 4> vc,
                           ffi::Buffer<ffi::S32, 1> n, ffi::Buffer<ffi::F32, 3> k, ffi::Buffer<ffi::F32, 3> v,
                           ffi::ResultBuffer<ffi::F32, 4> out) {
  const auto qd = q.dimensions(), cd = kc.dimensions();
  if (!shapes_agree(qd, cd, vc.dimensions(), n.dimensions()[0], k.dimensions(), v.dimensions()))
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, caches, n, k and v do not agree");
  Attn a{q.typed_data(), kc.typed_data(), vc.typed_data(), k.typed_data(), v.typed_data()};
  a.n = n.typed_data(), a.out = out->typed_data(), a.kv = qd[1], a.g = qd[2], a.s = cd[2], a.d = qd[3];
  a.scale = 1.f / std::sqrt(float(a.d));
  run<float>(a, qd[0]);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionInt8(ffi::Buffer<ffi::F32, 4> q, ffi::Buffer<ffi::S8, 4> kq, ffi::Buffer<ffi::F32, 4> ks,
                               ffi::Buffer<ffi::S8, 4> vq, ffi::Buffer<ffi::F32, 4> vs, ffi::Buffer<ffi::S32, 1> n,
                               ffi::Buffer<ffi::F32, 3> k, ffi::Buffer<ffi::F32, 3> v,
                               ffi::ResultBuffer<ffi::F32, 4> out) {
  const auto qd = q.dimensions(), cd = kq.dimensions(), sd = ks.dimensions(), td = vs.dimensions();
  bool ok = shapes_agree(qd, cd, vq.dimensions(), n.dimensions()[0], k.dimensions(), v.dimensions());
  for (int i = 0; i < 3; ++i) ok = ok && sd[i] == cd[i] && td[i] == cd[i];
  if (!ok || sd[3] != 1 || td[3] != 1)
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, int8 caches, scales, n, k and v do not agree");
  Attn a{q.typed_data(), ks.typed_data(), vs.typed_data(), k.typed_data(), v.typed_data()};
  a.kq = kq.typed_data(), a.vq = vq.typed_data();
  a.n = n.typed_data(), a.out = out->typed_data(), a.kv = qd[1], a.g = qd[2], a.s = cd[2], a.d = qd[3];
  a.scale = 1.f / std::sqrt(float(a.d));
  run<int8_t>(a, qd[0]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::S32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxllama_decode_attention_int8, DecodeAttentionInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::S8>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::S8>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::S32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>());
