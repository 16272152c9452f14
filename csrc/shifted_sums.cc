// Per-channel sums for batch norm on the CPU, as XLA FFI custom calls.
//
// For inputs of shape (B, P, C, Q) (any leading axes folded into B; channels on C;
// passed as (B..., P, C * Q) with the attribute q = Q),
// each kernel takes two sums per (b, c) over p and q in ONE pass over its inputs:
//
// jbn_shifted_sums, the batch statistics: for x, a shift near the mean (the ninther
// of nine of the channel's values sampled across the batch at positions given in the
// attribute at, see Shifts), and
//
//   s1[b, c] = sum_{p, q} d,   s2[b, c] = sum_{p, q} d * d,   d = x[b, p, c, q] - shift[b, c];
//
// jbn_dot_sums, a backward pass's: for g (the output's gradient), x and a given shift,
//
//   s1[b, c] = sum_{p, q} g,   s2[b, c] = sum_{p, q} g * d.
//
// d is taken in float32, as XLA would. Values are added in float32 within blocks of
// at most 256 per channel, and the block sums in float64, so the sums are those of
// float64 up to a rounding error of a few float32 ulps, and do not depend on the
// number of threads.
//
// Why kernels: XLA's CPU reductions run a plain sum(x) fast but any
// reduction with an elementwise operation fused in (here the shift that keeps the
// variance accurate for data with a large mean) at about half that speed, take
// one pass over the data per sum, and bfloat16 no faster than float32. These
// kernels take one pass for both sums, on XLA's intra-op threads, and read
// bfloat16 directly as vectors, without a float32 copy.
//
// Inputs: float32 or bfloat16 (g and x each). shift, s1, s2: (B, C) float32.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// x86-64 builds get an AVX2+FMA clone of each hot loop, chosen at load time; the
// default clone runs anywhere.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define JBN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef JBN_CLONES
#define JBN_CLONES
#endif

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {  // bfloat16 bits
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

__attribute__((always_inline)) inline Vec LoadVec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bfloat16: widened to 32 bits and shifted into a float's high half, as vectors
// (with AVX2, one vpmovzxwd and one vpslld per 8 values).
typedef uint16_t Bf16Vec __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t BitsVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

__attribute__((always_inline)) inline Vec LoadVec(const uint16_t* p) {
  Bf16Vec h;
  std::memcpy(&h, p, sizeof h);
  const BitsVec bits = __builtin_convertvector(h, BitsVec) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// The two sums a pass takes: Add(i, s, a1, a2) adds those of the value at element
// offset i against its shift s (as vectors of kLanes values, or one value).
//
// Squares: one input x; sums d and d * d, d = x - s (the batch statistics).
template <typename T>
struct Squares {
  const T* x;
  __attribute__((always_inline)) void Add(int64_t i, Vec s, Vec& a1, Vec& a2) const {
    const Vec d = LoadVec(x + i) - s;
    a1 += d;
    a2 += d * d;
  }
  __attribute__((always_inline)) void Add(int64_t i, float s, float& a1, float& a2) const {
    const float d = ToFloat(x[i]) - s;
    a1 += d;
    a2 += d * d;
  }
};

// Products: inputs g and x; sums g and g * d, d = x - s (a backward pass's sums of
// the output's gradient, and of it times the centred input).
template <typename G, typename T>
struct Products {
  const G* g;
  const T* x;
  __attribute__((always_inline)) void Add(int64_t i, Vec s, Vec& a1, Vec& a2) const {
    const Vec v = LoadVec(g + i);
    a1 += v;
    a2 += v * (LoadVec(x + i) - s);
  }
  __attribute__((always_inline)) void Add(int64_t i, float s, float& a1, float& a2) const {
    const float v = ToFloat(g[i]);
    a1 += v;
    a2 += v * (ToFloat(x[i]) - s);
  }
};

// The sum of a vector's lanes, as a tree of float32 additions: lane l with lane l + 4,
// then with l + 2, then the two left. (Clang's shuffle builtin, else GCC's, which
// GCC before 12 has alone.)
__attribute__((always_inline)) inline float LaneSum(Vec v) {
  static_assert(kLanes == 8, "LaneSum adds eight lanes");
#if defined(__clang__)
  const Vec h = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const Vec q = h + __builtin_shufflevector(h, h, 2, 3, 0, 1, 6, 7, 4, 5);
#else
  typedef int32_t Lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const Vec h = v + __builtin_shuffle(v, Lanes{4, 5, 6, 7, 0, 1, 2, 3});
  const Vec q = h + __builtin_shuffle(h, Lanes{2, 3, 0, 1, 6, 7, 4, 5});
#endif
  return q[0] + q[1];
}

// Q > 1: rows [r0, r1) of the (B * P * C, Q) matrix, row r against
// shift[(r / (P * C)) * C + r % C]; its sums go to o1[r], o2[r]. A block's lanes and
// its last values are added in float32 and the block's sum then in float64, so that a
// short row (Q = 49 at 7x7) costs a few vector additions beyond its loads.
template <typename Op>
JBN_CLONES void RowSums(const Op op, const float* shift, int64_t pc, int64_t c, int64_t m,
                        int64_t r0, int64_t r1, double* o1, double* o2) {
  constexpr int64_t kBlock = 256;  // at most 32 values per lane per float32 block
  // The row's shift index, kept as the rows advance (no division per row).
  int64_t mat = r0 / pc, in_mat = r0 % pc, k = r0 % c;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = r * m;
    const float s = shift[mat * c + k];
    if (++k == c) k = 0;
    if (++in_mat == pc) in_mat = 0, ++mat;
    const Vec sv = {s, s, s, s, s, s, s, s};
    double t1 = 0, t2 = 0;
    for (int64_t i = 0; i < m; i += kBlock) {
      const int64_t end = std::min(m, i + kBlock);
      Vec a1 = {}, a2 = {}, b1 = {}, b2 = {};
      int64_t j = i;
      for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
        op.Add(row + j, sv, a1, a2);
        op.Add(row + j + kLanes, sv, b1, b2);
      }
      if (j + kLanes <= end) {
        op.Add(row + j, sv, a1, a2);
        j += kLanes;
      }
      float f1 = 0, f2 = 0;  // fewer than kLanes values left
      for (; j < end; ++j) op.Add(row + j, s, f1, f2);
      t1 += double(LaneSum(a1 + b1) + f1);
      t2 += double(LaneSum(a2 + b2) + f2);
    }
    o1[r] = t1;
    o2[r] = t2;
  }
}

// The sums of tv vectors of channels from vector v0, over rows [i, end) of the (M, C)
// matrix at element offset base, added to t1, t2 (one float64 addition per channel):
// the float32 sums stay in registers while the rows are read in order.
template <int64_t tv, typename Op>
__attribute__((always_inline)) inline void TileSums(const Op& op, int64_t base,
                                                    const float* shift, int64_t k,
                                                    int64_t v0, int64_t i, int64_t end,
                                                    double* t1, double* t2) {
  Vec a1[tv] = {}, a2[tv] = {}, s[tv];
  for (int64_t u = 0; u < tv; ++u) s[u] = LoadVec(shift + (v0 + u) * kLanes);
  for (int64_t r = i; r < end; ++r) {
    const int64_t row = base + r * k + v0 * kLanes;
    for (int64_t u = 0; u < tv; ++u) op.Add(row + u * kLanes, s[u], a1[u], a2[u]);
  }
  for (int64_t u = 0; u < tv; ++u) {
    for (int64_t l = 0; l < kLanes; ++l) {
      t1[(v0 + u) * kLanes + l] += a1[u][l];
      t2[(v0 + u) * kLanes + l] += a2[u][l];
    }
  }
}

// Q == 1: rows [m0, m1) of the (M, C) matrix at element offset base, each against
// the same (C,) shift; adds into t1, t2 (C float64 each). The rows go in blocks of
// 32; within a block, each tile of 4 vectors of channels is summed down the rows in
// float32 registers (on a 2-core Xeon about twice as fast as sums kept in an L1
// array across whole rows when the batch is in cache, and faster from memory too),
// then added in float64. The last C % kLanes channels are added one at a time. Each
// channel's values are added in the same order however the channels are tiled.
template <typename Op>
JBN_CLONES void ColumnSums(const Op op, int64_t base, const float* shift, int64_t k,
                           int64_t m0, int64_t m1, double* t1, double* t2) {
  constexpr int64_t kBlockRows = 32;
  constexpr int64_t kTile = 4;
  const int64_t vecs = k / kLanes;
  for (int64_t i = m0; i < m1; i += kBlockRows) {
    const int64_t end = std::min(m1, i + kBlockRows);
    int64_t v0 = 0;
    for (; v0 + kTile <= vecs; v0 += kTile) {
      TileSums<kTile>(op, base, shift, k, v0, i, end, t1, t2);
    }
    for (; v0 < vecs; ++v0) TileSums<1>(op, base, shift, k, v0, i, end, t1, t2);
    for (int64_t c = vecs * kLanes; c < k; ++c) {
      float a1 = 0, a2 = 0;
      for (int64_t q = i; q < end; ++q) op.Add(base + q * k + c, shift[c], a1, a2);
      t1[c] += a1;
      t2[c] += a2;
    }
  }
}

// Runs task(0..n-1) on the calling thread and on up to threads - 1 of the pool's.
// Returns once every task has finished. Tasks are claimed from a shared counter, so
// a pool thread that starts late (or never) delays nothing: the caller claims what
// is left, and waits only for tasks already running.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t threads, F task) {
  struct Counter {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counter = std::make_shared<Counter>();
  auto run = [counter, n, task]() {
    for (int64_t i; (i = counter->next.fetch_add(1)) < n;) {
      task(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool.Schedule(decltype(run)(run));
  run();
  while (counter->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Values per parallel task: below this, scheduling costs more than it saves.
constexpr int64_t kTaskValues = 1 << 15;

// Values per channel whose ninther is the shift (jbn/_ninther.py's SAMPLES).
constexpr int64_t kSamples = 9;

// The median of three values; NaN if any is NaN, as jbn/_ninther.py's median3 (XLA's
// minimum and maximum propagate NaN, where std::min and std::max drop it by position).
inline float Median3(float a, float b, float c) {
  if (std::isnan(a) || std::isnan(b) || std::isnan(c)) return a + b + c;
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

// Channels [k0, k1) of matrix i: n sampled values each, at offset[j] from the channel's first.
template <typename T>
JBN_CLONES void ShiftRange(const T* x, int64_t p, int64_t c, int64_t q, const int64_t* offset,
                           int64_t n, int64_t i, int64_t k0, int64_t k1, float* shift) {
  const T* xb = x + i * p * c * q;
  for (int64_t k = k0; k < k1; ++k) {
    const T* xc = xb + k * q;
    float v[kSamples];
    for (int64_t j = 0; j < n; ++j) v[j] = ToFloat(xc[offset[j]]);
    const float s = n == 1 ? v[0]
                           : Median3(Median3(v[0], v[1], v[2]), Median3(v[3], v[4], v[5]),
                                     Median3(v[6], v[7], v[8]));
    // Not finite (infinities or NaN sampled): 0, as jbn/_ninther.py does.
    shift[i * c + k] = std::isfinite(s) ? s : 0.0f;
  }
}

// Channels per parallel task of Shifts.
constexpr int64_t kShiftChannels = 256;

// shift[b, c]: the ninther (median of three medians of three) of the channel's values at
// the n = 9 flat positions at[j] among its R = P * Q values in row-major order (p, q):
// three runs of three, spread over the batch's axes by jbn/_ninther.py; n = 1: the one
// value at at[0]. A value of the data near the bulk of it, whatever its first values,
// read from nine rows of channels (Q == 1) or from three short runs per channel.
template <typename T>
void Shifts(ffi::ThreadPool& pool, const T* x, int64_t b, int64_t p, int64_t c, int64_t q,
            ffi::Span<const int64_t> at, float* shift) {
  const int64_t n = int64_t(at.size());
  int64_t offset[kSamples];  // of each sampled value from its channel's first value
  for (int64_t j = 0; j < n; ++j) offset[j] = at[j] / q * c * q + at[j] % q;
  // Nine short reads per channel, scattered with channels first: in parallel where
  // there are many channels.
  const int64_t chunks = (c + kShiftChannels - 1) / kShiftChannels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  ParallelFor(pool, b * chunks, threads, [=](int64_t t) {
    const int64_t i = t / chunks, k0 = (t % chunks) * kShiftChannels;
    ShiftRange<T>(x, p, c, q, offset, n, i, k0, std::min(c, k0 + kShiftChannels), shift);
  });
}

// Op's two sums per (b, c) over p and q, for inputs of shape (B, P, C, Q) against
// shift (B, C), into o1 and o2 ((B, C) float32), on up to all of the pool's
// threads. The work is split in parts that depend only on the shape, and the parts'
// float64 sums are added in order, so the values do not depend on the threads.
template <typename Op>
void ChannelSums(ffi::ThreadPool& pool, const Op op, int64_t b, int64_t p, int64_t c,
                 int64_t q, const float* sp, float* o1, float* o2) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (q > 1) {  // a row of Q values per (b, p, c)
    const int64_t rows = b * p * c;
    std::vector<double> partial(size_t(2 * rows));
    double* t1 = partial.data();
    double* t2 = t1 + rows;
    const int64_t rows_per_task = std::max<int64_t>(1, kTaskValues / q);
    const int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
    ParallelFor(pool, tasks, threads, [=](int64_t t) {
      const int64_t r0 = t * rows_per_task;
      RowSums<Op>(op, sp, p * c, c, q, r0, std::min(rows, r0 + rows_per_task), t1, t2);
    });
    for (int64_t i = 0; i < b; ++i) {  // rows of a channel in order, each read in order
      double* a1 = t1 + i * p * c;
      double* a2 = t2 + i * p * c;
      for (int64_t j = 1; j < p; ++j) {
        for (int64_t k = 0; k < c; ++k) {
          a1[k] += a1[j * c + k];
          a2[k] += a2[j * c + k];
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        o1[i * c + k] = float(a1[k]);
        o2[i * c + k] = float(a2[k]);
      }
    }
    return;
  }

  // Q == 1: each (P, C) matrix's rows in parts, each part's sums kept apart.
  const int64_t m = p;
  const int64_t rows_per_part = std::max<int64_t>(
      std::max<int64_t>(1, kTaskValues / c), (m + 63) / 64);
  const int64_t parts = (m + rows_per_part - 1) / rows_per_part;
  std::vector<double> partial(size_t(b * parts * 2 * c), 0.0);
  double* pp = partial.data();
  ParallelFor(pool, b * parts, threads, [=](int64_t t) {
    const int64_t mat = t / parts, part = t % parts;
    const int64_t m0 = part * rows_per_part;
    double* t1 = pp + t * 2 * c;
    ColumnSums<Op>(op, mat * m * c, sp + mat * c, c, m0, std::min(m, m0 + rows_per_part),
                   t1, t1 + c);
  });
  for (int64_t mat = 0; mat < b; ++mat) {  // parts in order, each read in order
    double* first = pp + mat * parts * 2 * c;
    for (int64_t part = 1; part < parts; ++part) {
      const double* t1 = first + part * 2 * c;
      for (int64_t k = 0; k < 2 * c; ++k) first[k] += t1[k];
    }
    for (int64_t k = 0; k < c; ++k) {
      o1[mat * c + k] = float(first[k]);
      o2[mat * c + k] = float(first[c + k]);
    }
  }
}

// (B, P, C, Q) from an input of shape (B..., P, C * Q) and Q: its leading axes
// folded. (A trailing axis of length 1 would make XLA copy the input to lay it out
// for the call, so C and Q share one axis.)
struct Dims {
  int64_t b, p, c, q;
  int64_t values() const { return b * p * c * q; }
};

// False where x has rank below 2, or its last axis is not a multiple of q >= 1.
bool DimsOf(const ffi::AnyBuffer& x, int64_t q, Dims* d) {
  const auto dims = x.dimensions();
  if (dims.size() < 2 || q < 1 || dims[dims.size() - 1] % q != 0) return false;
  *d = Dims{1, dims[dims.size() - 2], dims[dims.size() - 1] / q, q};
  for (size_t i = 0; i + 2 < dims.size(); ++i) d->b *= dims[i];
  return true;
}

bool IsChannelVector(const ffi::AnyBuffer& v, const Dims& d) {
  return v.element_type() == ffi::DataType::F32 && int64_t(v.element_count()) == d.b * d.c;
}

// Calls f with a null pointer of the element type of t: float, or uint16_t for
// bfloat16 bits.
template <typename F>
ffi::Error WithElementType(ffi::DataType t, F f) {
  switch (t) {
    case ffi::DataType::F32:
      return f(static_cast<const float*>(nullptr));
    case ffi::DataType::BF16:
      return f(static_cast<const uint16_t*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("inputs must be float32 or bfloat16");
  }
}

template <typename P>
using Pointee = std::remove_const_t<std::remove_pointer_t<P>>;

// x: (B..., P, C * Q) -> shift, s1 = sum(x - shift), s2 = sum((x - shift)^2), each (B, C).
ffi::Error ShiftedSums(ffi::ThreadPool pool, int64_t q, ffi::Span<const int64_t> at,
                       ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> shift,
                       ffi::Result<ffi::AnyBuffer> s1, ffi::Result<ffi::AnyBuffer> s2) {
  Dims d;
  if (!DimsOf(x, q, &d)) {
    return ffi::Error::InvalidArgument("x must be (B..., P, C * Q) with q = Q >= 1");
  }
  const bool in_range = std::all_of(at.begin(), at.end(), [&](int64_t t) {
    return t >= 0 && t < d.p * d.q;
  });
  if (d.values() > 0 && ((at.size() != 1 && at.size() != size_t(kSamples)) || !in_range)) {
    return ffi::Error::InvalidArgument("at must hold 1 or 9 positions in [0, P * Q)");
  }
  if (!IsChannelVector(*shift, d) || !IsChannelVector(*s1, d) || !IsChannelVector(*s2, d)) {
    return ffi::Error::InvalidArgument("shift, s1 and s2 must be float32 with B * C elements");
  }
  float* sp = shift->typed_data<float>();
  float* o1 = s1->typed_data<float>();
  float* o2 = s2->typed_data<float>();
  if (d.values() == 0) {  // no values: sums 0, shift 0
    std::fill(sp, sp + d.b * d.c, 0.0f);
    std::fill(o1, o1 + d.b * d.c, 0.0f);
    std::fill(o2, o2 + d.b * d.c, 0.0f);
    return ffi::Error::Success();
  }
  return WithElementType(x.element_type(), [&](auto type) {
    using T = Pointee<decltype(type)>;
    const T* xp = reinterpret_cast<const T*>(x.untyped_data());
    Shifts<T>(pool, xp, d.b, d.p, d.c, d.q, at, sp);
    ChannelSums(pool, Squares<T>{xp}, d.b, d.p, d.c, d.q, sp, o1, o2);
    return ffi::Error::Success();
  });
}

// g, x: (B..., P, C * Q), shift: (B, C) -> s1 = sum(g), s2 = sum(g * (x - shift)), each (B, C).
ffi::Error DotSums(ffi::ThreadPool pool, int64_t q, ffi::AnyBuffer g, ffi::AnyBuffer x,
                   ffi::AnyBuffer shift, ffi::Result<ffi::AnyBuffer> s1,
                   ffi::Result<ffi::AnyBuffer> s2) {
  Dims d;
  if (!DimsOf(x, q, &d)) {
    return ffi::Error::InvalidArgument("x must be (B..., P, C * Q) with q = Q >= 1");
  }
  const auto gd = g.dimensions(), xd = x.dimensions();
  if (!std::equal(gd.begin(), gd.end(), xd.begin(), xd.end())) {
    return ffi::Error::InvalidArgument("g and x must have the same shape");
  }
  if (!IsChannelVector(shift, d) || !IsChannelVector(*s1, d) || !IsChannelVector(*s2, d)) {
    return ffi::Error::InvalidArgument("shift, s1 and s2 must be float32 with B * C elements");
  }
  const float* sp = reinterpret_cast<const float*>(shift.untyped_data());
  float* o1 = s1->typed_data<float>();
  float* o2 = s2->typed_data<float>();
  if (d.values() == 0) {
    std::fill(o1, o1 + d.b * d.c, 0.0f);
    std::fill(o2, o2 + d.b * d.c, 0.0f);
    return ffi::Error::Success();
  }
  return WithElementType(g.element_type(), [&](auto g_type) {
    return WithElementType(x.element_type(), [&](auto x_type) {
      using G = Pointee<decltype(g_type)>;
      using T = Pointee<decltype(x_type)>;
      const Products<G, T> op{reinterpret_cast<const G*>(g.untyped_data()),
                              reinterpret_cast<const T*>(x.untyped_data())};
      ChannelSums(pool, op, d.b, d.p, d.c, d.q, sp, o1, o2);
      return ffi::Error::Success();
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnShiftedSums, ShiftedSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("q")
                                  .Attr<ffi::Span<const int64_t>>("at")
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnDotSums, DotSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("q")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The Python module: `shifted_sums` and `dot_sums`, the handlers as capsules for
// jax.ffi.register_ffi_target, and `ffi_api_version`, the (major, minor) version of
// the XLA FFI headers they were compiled against (a jaxlib older than those refuses
// the handlers, and with them the whole CPU backend).
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_shifted_sums",
                              "jbn's CPU kernels for per-channel shifted sums.", -1,
                              nullptr, nullptr, nullptr, nullptr, nullptr};

static bool AddHandler(PyObject* module, const char* name, void* handler) {
  PyObject* capsule = PyCapsule_New(handler, nullptr, nullptr);
  if (capsule == nullptr) return false;
  if (PyModule_AddObject(module, name, capsule) < 0) {
    Py_DECREF(capsule);
    return false;
  }
  return true;
}

PyMODINIT_FUNC PyInit__shifted_sums() {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  if (!AddHandler(module, "shifted_sums", reinterpret_cast<void*>(&JbnShiftedSums)) ||
      !AddHandler(module, "dot_sums", reinterpret_cast<void*>(&JbnDotSums))) {
    Py_DECREF(module);
    return nullptr;
  }
  PyObject* version = Py_BuildValue("(ii)", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  if (version == nullptr || PyModule_AddObject(module, "ffi_api_version", version) < 0) {
    Py_XDECREF(version);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
