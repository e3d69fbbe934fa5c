// Shared by jaxllama's native CPU kernels (cpu_kernels.cc: int8/int4 weights; cpu_fmatmul.cc:
// float32 weights): the vector abstraction, the prefetch distance, the problem description, and
// the worker threads. See jaxllama/model/cpu_kernels.py. Named namespace and inline functions: both
// files share one set of worker threads (Workers::get's static).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
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


namespace jaxllama_kernels {

// ---- vector abstraction: W float lanes, loads of W int8 / W packed-int4 bytes ----------------

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  // In a register: a value used by several FMAs is loaded once, not folded into each of them.
  static void keep(T& a) { __asm__("" : "+v"(a)); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T a) { _mm512_storeu_ps(p, a); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static float hmax(T a) { return _mm512_reduce_max_ps(a); }
  // e^x to ~2 ulp (Cephes' polynomial after x = n ln2 + r); 0 below -87 (so e^-inf is 0).
  static T exp(T x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    T y = _mm512_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
      y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(live, _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
  }
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
  static void store(float* p, T a) { _mm256_storeu_ps(p, a); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static float hmax(T a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static T exp(T x) {  // as the AVX-512 one
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    const T n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    T y = _mm256_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
      y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(live, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
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
  static void store(float* p, T a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
  static T set1(float s) { T r; for (int i = 0; i < W; ++i) r.v[i] = s; return r; }
  static T fma(T a, T b, T c) { for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static T mul(T a, T b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
  static T add(T a, T b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
  static T sub(T a, T b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
  static T max(T a, T b) { for (int i = 0; i < W; ++i) a.v[i] = std::max(a.v[i], b.v[i]); return a; }
  static float hmax(T a) { float s = a.v[0]; for (int i = 1; i < W; ++i) s = std::max(s, a.v[i]); return s; }
  static T exp(T a) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] < -87.f ? 0.f : std::exp(a.v[i]); return a; }
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

struct Problem;
using RangeFn = void (*)(const Problem&, int64_t, int64_t);

// Chunks of outputs [0, out_n) shared by the caller and the workers, each done by ``range``. Held by
// shared_ptr: a worker that looks after the caller has returned finds no chunk left and touches
// nothing else.
struct Shared {
  Problem p;
  RangeFn range;
  int64_t chunk, nchunks;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      range(p, c * chunk, std::min(p.out_n, (c + 1) * chunk));
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
inline std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t(std::getenv("JAXLLAMA_KERNEL_SPIN_US") ? std::atol(std::getenv("JAXLLAMA_KERNEL_SPIN_US")) : 2000);
  return t;
}
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
        if ((spins & 255) || std::chrono::steady_clock::now() - start < spin_time()) {
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

// Runs ``range`` over [0, p.out_n) in chunks of at least ``align`` outputs on the caller and the
// workers: ``cost`` bytes of work in all (at least kChunkBytes a chunk, so that small products run on
// the calling thread alone; else a few chunks per thread, for balance).
inline void parallel_for(const Problem& p, RangeFn range, int64_t cost, int64_t align) {
  Workers& workers = Workers::get();
  const int64_t threads = workers.count() + 1;
  int64_t nchunks = threads > 1 ? std::min<int64_t>(4 * threads, cost / kChunkBytes) : 1;
  nchunks = std::max<int64_t>(1, std::min<int64_t>(nchunks, (p.out_n + align - 1) / align));
  if (nchunks == 1) {
    range(p, 0, p.out_n);
    return;
  }
  auto sh = std::make_shared<Shared>();
  sh->p = p;
  sh->range = range;
  sh->chunk = ((p.out_n + nchunks - 1) / nchunks + align - 1) / align * align;
  sh->nchunks = (p.out_n + sh->chunk - 1) / sh->chunk;
  workers.run(sh);
}

}  // namespace jaxllama_kernels
