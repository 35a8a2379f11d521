// CPU kernels of ssmjax.scan.conv.causal_conv1d (the short depthwise causal conv), called
// through XLA's FFI.
//
//   y[b, t, c] = sum_j w[j, c] src(b, t - (k - 1) + j, c)        (forward)
//   dsrc(b, s, c) = sum_j w[j, c] g[b, s + (k - 1) - j, c]        (backward, gathered)
//   dw[j, c] = sum_{b, t} g[b, t, c] src(b, t - (k - 1) + j, c)
//
// with src(b, s) = x[b, s] for s >= 0 and history[b, k - 1 + s] for s < 0, and a tap
// counted only when the source is in the output's document (doc[b, s] == doc[b, t]; the
// history is in document 0). One pass over the sequence each way, channels the vectorised
// (innermost, contiguous) axis; work split over (batch row, block of time) units on XLA's
// intra-op thread pool, the weight gradient summed over units in a fixed order.
//
// Layouts (row-major): x, y, g, dx [b, T, C]; w, dw [k, C]; history, dhistory [b, k-1, C];
// doc [b, T] int32.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "_cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using ssmjax_cpu::data;
using ssmjax_cpu::parallel_for;

namespace {

constexpr int64_t kBlock = 256;  // tokens per unit

struct Shape {
  int64_t b, T, C, k;
  int64_t blocks() const { return std::max<int64_t>(1, (T + kBlock - 1) / kBlock); }
};

template <typename T>
struct Source {
  const Shape& s;
  const T* x;
  const T* history;
  const int32_t* doc;
  const T* row(int64_t b, int64_t src) const {
    return src >= 0 ? x + (b * s.T + src) * s.C : history + (b * (s.k - 1) + s.k - 1 + src) * s.C;
  }
  int32_t doc_of(int64_t b, int64_t src) const { return src >= 0 ? doc[b * s.T + src] : 0; }
};

template <typename T>
void forward_unit(const Shape& s, const Source<T>& src, const T* w, T* y, int64_t b, int64_t t0, int64_t t1) {
  const int64_t C = s.C, k = s.k;
  for (int64_t t = t0; t < t1; ++t) {
    T* yt = y + (b * s.T + t) * C;
    std::fill(yt, yt + C, T(0));
    const int32_t dt = src.doc[b * s.T + t];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t from = t - (k - 1) + j;
      if (src.doc_of(b, from) != dt) continue;
      const T* xs = src.row(b, from);
      const T* wj = w + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yt[c] += wj[c] * xs[c];
    }
  }
}

// dsrc of source position `from` (< 0: the history) into out [C].
template <typename T>
inline void input_gradient(const Shape& s, const Source<T>& src, const T* w, const T* g, int64_t b, int64_t from,
                           T* out) {
  const int64_t C = s.C, k = s.k;
  std::fill(out, out + C, T(0));
  const int32_t ds = src.doc_of(b, from);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t t = from + (k - 1) - j;  // the output whose tap j reads `from`
    if (t < 0 || t >= s.T || src.doc[b * s.T + t] != ds) continue;
    const T* gt = g + (b * s.T + t) * C;
    const T* wj = w + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += wj[c] * gt[c];
  }
}

// Tokens [t0, t1) of row b: dx of those positions and the weight gradient of those outputs
// (into dw [k, C]) in one pass; the first block also writes dhistory.
template <typename T>
void backward_unit(const Shape& s, const Source<T>& src, const T* w, const T* g, T* dx, T* dhist, T* dw,
                   int64_t b, int64_t t0, int64_t t1) {
  const int64_t C = s.C, k = s.k;
  if (t0 == 0)
    for (int64_t from = -(k - 1); from < 0; ++from)
      input_gradient(s, src, w, g, b, from, dhist + (b * (k - 1) + k - 1 + from) * C);
  for (int64_t t = t0; t < t1; ++t) {
    input_gradient(s, src, w, g, b, t, dx + (b * s.T + t) * C);
    const T* gt = g + (b * s.T + t) * C;
    const int32_t dt = src.doc[b * s.T + t];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t from = t - (k - 1) + j;
      if (src.doc_of(b, from) != dt) continue;
      const T* xs = src.row(b, from);
      T* dwj = dw + j * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dwj[c] += gt[c] * xs[c];
    }
  }
}

ffi::Error shape_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, Shape* s) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 2 || wd[1] != xd[2] || wd[0] < 1)
    return ffi::Error::InvalidArgument("causal conv kernel: bad shapes");
  *s = Shape{xd[0], xd[1], xd[2], wd[0]};
  return ffi::Error::Success();
}

template <typename T>
ffi::Error forward_typed(ffi::ThreadPool pool, const Shape& s, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::AnyBuffer history, ffi::AnyBuffer doc, ffi::Result<ffi::AnyBuffer> y) {
  Source<T> src{s, data<T>(x), data<T>(history), data<int32_t>(doc)};
  const int64_t blocks = s.blocks();
  parallel_for(pool, s.b * blocks, pool.num_threads(), [&](int64_t unit) {
    const int64_t b = unit / blocks, blk = unit % blocks;
    forward_unit<T>(s, src, data<T>(w), data<T>(y), b, blk * kBlock, std::min(s.T, (blk + 1) * kBlock));
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer history,
                   ffi::AnyBuffer doc, ffi::Result<ffi::AnyBuffer> y) {
  Shape s;
  if (auto err = shape_of(x, w, &s); err.failure()) return err;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return forward_typed<float>(pool, s, x, w, history, doc, y);
    case ffi::DataType::F64:
      return forward_typed<double>(pool, s, x, w, history, doc, y);
    default:
      return ffi::Error::InvalidArgument("causal conv kernel: float32 or float64 only");
  }
}

template <typename T>
ffi::Error backward_typed(ffi::ThreadPool pool, const Shape& s, ffi::AnyBuffer x, ffi::AnyBuffer w,
                          ffi::AnyBuffer history, ffi::AnyBuffer doc, ffi::AnyBuffer g,
                          ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Result<ffi::AnyBuffer> dhist) {
  Source<T> src{s, data<T>(x), data<T>(history), data<int32_t>(doc)};
  const int64_t blocks = s.blocks(), units = s.b * blocks, kc = s.k * s.C;
  std::vector<T> dw_units(units * kc, T(0));
  parallel_for(pool, units, pool.num_threads(), [&](int64_t unit) {
    const int64_t b = unit / blocks, blk = unit % blocks;
    const int64_t t0 = blk * kBlock, t1 = std::min(s.T, (blk + 1) * kBlock);
    backward_unit<T>(s, src, data<T>(w), data<T>(g), data<T>(dx), data<T>(dhist), &dw_units[unit * kc], b, t0,
                     t1);
  });
  T* out = data<T>(dw);
  std::fill(out, out + kc, T(0));
  for (int64_t unit = 0; unit < units; ++unit)
#pragma omp simd
    for (int64_t i = 0; i < kc; ++i) out[i] += dw_units[unit * kc + i];
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer history,
                    ffi::AnyBuffer doc, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> dhist) {
  Shape s;
  if (auto err = shape_of(x, w, &s); err.failure()) return err;
  switch (x.element_type()) {
    case ffi::DataType::F32:
      return backward_typed<float>(pool, s, x, w, history, doc, g, dx, dw, dhist);
    case ffi::DataType::F64:
      return backward_typed<double>(pool, s, x, w, history, doc, g, dx, dw, dhist);
    default:
      return ffi::Error::InvalidArgument("causal conv kernel: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmjaxCausalConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Arg<ffi::AnyBuffer>()  // history
                                  .Arg<ffi::AnyBuffer>()  // doc (int32)
                                  .Ret<ffi::AnyBuffer>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmjaxCausalConvBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // weight
                                  .Arg<ffi::AnyBuffer>()  // history
                                  .Arg<ffi::AnyBuffer>()  // doc (int32)
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dweight
                                  .Ret<ffi::AnyBuffer>());  // dhistory
