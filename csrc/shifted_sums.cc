// Per-channel shifted sums for batch norm on the CPU, as an XLA FFI custom call.
//
// For x of shape (B, P, C, Q) (any leading axes folded into B; channels on C), the
// kernel takes for every (b, c) a shift near the mean: the mean of a corner block
// of up to 8 values of the channel (a power of two of them: the first values of
// the channel's first rows), and then, in ONE pass over x,
//
//   s1[b, c] = sum_{p, q} d,   s2[b, c] = sum_{p, q} d * d,   d = x[b, p, c, q] - shift[b, c]
//
// (d in float32, as XLA would compute it). Values are added in float32 within
// blocks of at most 256 per channel, and the block sums in float64, so the sums
// are those of float64 up to a rounding error of a few float32 ulps, and do not
// depend on the number of threads.
//
// Why a kernel: XLA's CPU reductions run a plain sum(x) or sum(x * x) fast, but any
// reduction with an elementwise operation fused in (here the shift that keeps the
// variance accurate for data with a large mean) at about half that speed, take one
// pass over x per sum, and launch a few more small programs for the shift. This
// kernel takes one pass for both sums, with the shift, and reads bfloat16
// directly, without a float32 copy of the input.
//
// x: float32 or bfloat16. shift, s1, s2: (B, C) float32.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
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
// The same, aligned as a float (for scratch arrays of floats).
typedef float UVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {  // bfloat16 bits
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
__attribute__((always_inline)) inline Vec LoadVec(const T* p) {
  float f[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) f[l] = ToFloat(p[l]);
  Vec v;
  std::memcpy(&v, f, sizeof v);
  return v;
}

// Q > 1: rows [r0, r1) of the (B * P * C, Q) matrix, row r against
// shift[(r / (P * C)) * C + r % C]; its sums go to o1[r], o2[r].
template <typename T>
JBN_CLONES void RowSums(const T* x, const float* shift, int64_t pc, int64_t c,
                        int64_t m, int64_t r0, int64_t r1, double* o1, double* o2) {
  constexpr int64_t kBlock = 256;  // at most 32 values per lane per float32 block
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * m;
    const float s = shift[(r / pc) * c + r % c];
    const Vec sv = {s, s, s, s, s, s, s, s};
    double t1 = 0, t2 = 0;
    for (int64_t i = 0; i < m; i += kBlock) {
      const int64_t end = std::min(m, i + kBlock);
      Vec a1 = {}, a2 = {}, b1 = {}, b2 = {};
      int64_t j = i;
      for (; j + 2 * kLanes <= end; j += 2 * kLanes) {
        const Vec d = LoadVec(row + j) - sv;
        const Vec e = LoadVec(row + j + kLanes) - sv;
        a1 += d;
        a2 += d * d;
        b1 += e;
        b2 += e * e;
      }
      if (j + kLanes <= end) {
        const Vec d = LoadVec(row + j) - sv;
        a1 += d;
        a2 += d * d;
        j += kLanes;
      }
      a1 += b1;
      a2 += b2;
      float f1 = 0, f2 = 0;  // fewer than kLanes values left
      for (; j < end; ++j) {
        const float d = ToFloat(row[j]) - s;
        f1 += d;
        f2 += d * d;
      }
      t1 += f1;
      t2 += f2;
      for (int64_t l = 0; l < kLanes; ++l) {
        t1 += a1[l];
        t2 += a2[l];
      }
    }
    o1[r] = t1;
    o2[r] = t2;
  }
}

// Q == 1: rows [m0, m1) of one (M, C) matrix, each against the same (C,) shift;
// adds into t1, t2 (C float64 each). f1, f2: C / kLanes vectors of scratch
// each, the float32 sums of a block of rows. Rows are read in order, so each
// value is one sequential load (a tile of channels walked down the rows is
// slower for C >= 128); the last C % kLanes channels are added one at a time.
template <typename T>
JBN_CLONES void ColumnSums(const T* x, const float* shift, int64_t k, int64_t m0,
                           int64_t m1, double* t1, double* t2, UVec* f1, UVec* f2) {
  constexpr int64_t kBlockRows = 32;
  const int64_t vecs = k / kLanes;
  for (int64_t i = m0; i < m1; i += kBlockRows) {
    const int64_t end = std::min(m1, i + kBlockRows);
    for (int64_t v = 0; v < vecs; ++v) f1[v] = f2[v] = Vec{};
    for (int64_t r = i; r < end; ++r) {
      for (int64_t v = 0; v < vecs; ++v) {
        const Vec d = LoadVec(x + r * k + v * kLanes) - LoadVec(shift + v * kLanes);
        f1[v] += d;
        f2[v] += d * d;
      }
    }
    for (int64_t v = 0; v < vecs; ++v) {
      for (int64_t l = 0; l < kLanes; ++l) {
        t1[v * kLanes + l] += f1[v][l];
        t2[v * kLanes + l] += f2[v][l];
      }
    }
    for (int64_t c = vecs * kLanes; c < k; ++c) {
      float a1 = 0, a2 = 0;
      for (int64_t q = i; q < end; ++q) {
        const float d = ToFloat(x[q * k + c]) - shift[c];
        a1 += d;
        a2 += d * d;
      }
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

inline int64_t PowerOfTwoAtMost(int64_t n) {
  int64_t p = 1;
  while (2 * p <= n) p *= 2;
  return p;
}

// Values per channel whose mean is the shift. The shift takes away the data's mean,
// however large; what is left, about std / 3 from the batch mean with 8 values,
// costs the shifted sums well under a bit, as they are added in float64. (jbn's XLA
// path takes 64 values, as it adds in float32.) Few values keep this read short
// where a channel has few values in all (NHWC 7x7 at batch 2: 98).
constexpr int64_t kShiftValues = 8;

// shift[b, c]: the mean of x[b, p, c, q] over p < P0, q < Q0, both powers of two.
template <typename T>
JBN_CLONES void Shifts(const T* x, int64_t b, int64_t p, int64_t c, int64_t q, float* shift) {
  const int64_t q0 = PowerOfTwoAtMost(std::min(q, kShiftValues));
  const int64_t p0 = PowerOfTwoAtMost(std::min(p, std::max<int64_t>(1, kShiftValues / q0)));
  const double scale = 1.0 / double(p0 * q0);
  std::vector<double> acc(static_cast<size_t>(c));
  for (int64_t i = 0; i < b; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = 0; j < p0; ++j) {
      const T* block = x + (i * p + j) * c * q;
      for (int64_t k = 0; k < c; ++k) {
        for (int64_t l = 0; l < q0; ++l) acc[k] += ToFloat(block[k * q + l]);
      }
    }
    for (int64_t k = 0; k < c; ++k) shift[i * c + k] = float(acc[k] * scale);
  }
}

template <typename T>
ffi::Error Sums(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> shift,
                ffi::Result<ffi::AnyBuffer> s1, ffi::Result<ffi::AnyBuffer> s2) {
  const auto dims = x.dimensions();
  if (dims.size() < 3) return ffi::Error::InvalidArgument("x must have rank 3 or more");
  const int64_t q = dims[dims.size() - 1];
  const int64_t c = dims[dims.size() - 2];
  const int64_t p = dims[dims.size() - 3];
  const int64_t pcq = p * c * q;
  int64_t b = 1;  // the leading axes, folded
  for (size_t i = 0; i + 3 < dims.size(); ++i) b *= dims[i];
  if (int64_t(shift->element_count()) != b * c || int64_t(s1->element_count()) != b * c ||
      int64_t(s2->element_count()) != b * c) {
    return ffi::Error::InvalidArgument("shift, s1 and s2 must have B * C elements");
  }
  const T* xp = reinterpret_cast<const T*>(x.untyped_data());
  float* sp = shift->typed_data<float>();
  float* o1 = s1->typed_data<float>();
  float* o2 = s2->typed_data<float>();
  if (b * c == 0) return ffi::Error::Success();
  if (pcq == 0) {  // no values: sums 0, shift 0
    std::fill(sp, sp + b * c, 0.0f);
    std::fill(o1, o1 + b * c, 0.0f);
    std::fill(o2, o2 + b * c, 0.0f);
    return ffi::Error::Success();
  }
  Shifts<T>(xp, b, p, c, q, sp);
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
      RowSums<T>(xp, sp, p * c, c, q, r0, std::min(rows, r0 + rows_per_task), t1, t2);
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
    return ffi::Error::Success();
  }

  // Q == 1: each (P, C) matrix's rows in parts that depend only on its shape (so do
  // the values), each part's sums kept apart and added in order at the end.
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
    const int64_t vecs = c / kLanes;
    std::vector<float> scratch(size_t(2 * vecs * kLanes));
    UVec* f1 = reinterpret_cast<UVec*>(scratch.data());
    ColumnSums<T>(xp + mat * m * c, sp + mat * c, c, m0, std::min(m, m0 + rows_per_part),
                  t1, t1 + c, f1, f1 + vecs);
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
  return ffi::Error::Success();
}

ffi::Error Dispatch(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> shift,
                    ffi::Result<ffi::AnyBuffer> s1, ffi::Result<ffi::AnyBuffer> s2) {
  if (shift->element_type() != ffi::DataType::F32 || s1->element_type() != ffi::DataType::F32 ||
      s2->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("shift, s1 and s2 must be float32");
  }
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return Sums<float>(pool, x, shift, s1, s2);
    case ffi::DataType::BF16:
      return Sums<uint16_t>(pool, x, shift, s1, s2);
    default:
      return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnShiftedSums, Dispatch,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// The Python module: `shifted_sums`, the handler as a capsule for
// jax.ffi.register_ffi_target.
static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_shifted_sums",
                              "jbn's CPU kernel for per-channel shifted sums.", -1,
                              nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__shifted_sums() {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  PyObject* capsule =
      PyCapsule_New(reinterpret_cast<void*>(&JbnShiftedSums), nullptr, nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "shifted_sums", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
