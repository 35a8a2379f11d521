// CPU kernels of ssmjax.scan.selective (Mamba-1's selective scan), called through XLA's FFI.
//
// The same chunk-recompute algorithm as the XLA "chunked" method, with every per-token
// pass fused into one loop over the [n, d] state held in cache:
//
//   forward:  h = exp(delta A) h + delta B u;  y = C . h   (one pass per token), storing
//             the state entering every chunk of `chunk` tokens;
//   backward: per chunk (last first), recompute its states and decays from the stored
//             start state, then walk it backwards once per token, accumulating every
//             cotangent (u, delta, A, B, C, initial state) in the same pass.
//
// Layouts (row-major, as ssmjax.scan.selective._selective_core passes them):
//   u, delta, y, du, ddelta  [b, T, d]      A, dA  [n, d]
//   B, C, dB, dC             [b, T, g, n]   keep   [b, T] (pred; false: decay 0)
//   state, final, d_state    [b, n, d]      starts [b, ceil(T / chunk), n, d]
// Channel e uses group e / (d / g). Work is split over (batch row, channel block) units on
// XLA's intra-op thread pool; channels are the vectorised (innermost, contiguous) axis.
// float32 uses a branch-free exp (exp_value below, ~1 ulp) that the compiler vectorises;
// float64 uses std::exp (scalar: float64 is for tests and references, not speed).
//
// Cost per (token, channel, state) element, float32: forward one exp and ~4 flops;
// backward one exp (the recompute) and ~16 flops. The exp (~17 vector instructions) is
// most of the forward and half the backward.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "_cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using ssmjax_cpu::data;
using ssmjax_cpu::parallel_for;

namespace {

inline float exp_value(float x) {
  // exp(x) = 2^m exp(r), m = round(x / ln 2), |r| <= ln(2) / 2 (Cody-Waite split of ln 2),
  // exp(r) = 1 + r + r^2 q(r) with q a degree-4 near-minimax fit (relative error 8e-9
  // in exact arithmetic, ~1 ulp in float32). Below ln(FLT_MIN) the result is FLT_MIN-ish
  // rather than 0 (no subnormals); above ln(FLT_MAX), inf; NaN stays NaN.
  const float lo = -87.33654475f, hi = 88.72283905f;
  const float xc = std::min(std::max(x, lo), hi);
  // round to nearest by adding and subtracting 1.5 * 2^23 (std::floor would not vectorise)
  const float m = std::min((xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f, 127.0f);
  float r = xc - m * 0.693359375f;
  r = r + m * 2.12194440e-4f;
  float q = 1.3571208110e-3f;
  q = q * r + 8.3726877347e-3f;
  q = q * r + 4.1673567146e-2f;
  q = q * r + 1.6666479409e-1f;
  q = q * r + 4.9999967217e-1f;
  const float p = q * (r * r) + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(m) + 127) << 23);
  return x > hi ? INFINITY : p * scale;
}

inline double exp_value(double x) { return std::exp(x); }

struct Shape {
  int64_t b, T, d, n, g, chunk;
  int64_t chunks() const { return (T + chunk - 1) / chunk; }
  int64_t per_group() const { return d / g; }
};

// Channel blocks per batch row: 8 or more units when the rows are few, blocks of >= 64
// channels. A function of the shape only, so the sums over blocks (dB, dC) are the same
// whatever the number of threads.
int64_t channel_blocks(const Shape& s) {
  if (s.b >= 8) return 1;
  return std::max<int64_t>(1, std::min((8 + s.b - 1) / s.b, s.d / 64));
}

void block_range(const Shape& s, int64_t blocks, int64_t k, int64_t* e0, int64_t* e1) {
  // boundaries rounded to 16 channels (whole vectors)
  auto edge = [&](int64_t j) { return j == blocks ? s.d : std::min(s.d, (s.d * j / blocks) / 16 * 16); };
  *e0 = edge(k);
  *e1 = edge(k + 1);
}

// The per-token input terms of channels [e0, e1): delta and delta * u.
template <typename T>
void load_token(const Shape& s, const T* u, const T* delta, int64_t row, int64_t e0, int64_t w, T* dl,
                T* dlu) {
  const T* ut = u + row * s.d + e0;
  const T* dt = delta + row * s.d + e0;
  for (int64_t e = 0; e < w; ++e) {
    dl[e] = dt[e];
    dlu[e] = dt[e] * ut[e];
  }
}

// Channels [s0, s1) of one state row k (one group's B_k, C_k) for one token.
template <typename T, bool kKeep, bool kDecay, bool kReadOut>
inline void step_row(int64_t s0, int64_t s1, const T* dl, const T* dlu, const T* Ak, T bk, T ck, const T* hp,
                     T* hk, T* ak, T* y) {
#pragma omp simd
  for (int64_t e = s0; e < s1; ++e) {
    const T a = kKeep ? exp_value(dl[e] * Ak[e]) : T(0);
    if constexpr (kDecay) ak[e] = a;
    const T h = a * hp[e] + dlu[e] * bk;
    hk[e] = h;
    if constexpr (kReadOut) y[e] += ck * h;
  }
}

// One token of the recurrence on the state [n, w] of channels [e0, e0 + w), from h_in to
// h_out (may alias); stores the decays to `decay` [n, w] (kDecay) and accumulates the
// readout C . h into y [w] (kReadOut).
template <typename T, bool kDecay, bool kReadOut>
void step(const Shape& s, const T* A, const T* Bt, const T* Ct, bool keep, int64_t e0, int64_t w,
          const T* dl, const T* dlu, const T* h_in, T* h_out, T* decay, T* y) {
  const int64_t per = s.per_group();
  for (int64_t k = 0; k < s.n; ++k) {
    const T* Ak = A + k * s.d + e0;
    T* ak = kDecay ? decay + k * w : nullptr;
    for (int64_t gi = e0 / per; gi * per < e0 + w; ++gi) {
      const int64_t s0 = std::max(e0, gi * per) - e0, s1 = std::min(e0 + w, (gi + 1) * per) - e0;
      const T bk = Bt[gi * s.n + k], ck = kReadOut ? Ct[gi * s.n + k] : T(0);
      if (keep)
        step_row<T, true, kDecay, kReadOut>(s0, s1, dl, dlu, Ak, bk, ck, h_in + k * w, h_out + k * w, ak, y);
      else
        step_row<T, false, kDecay, kReadOut>(s0, s1, dl, dlu, Ak, bk, ck, h_in + k * w, h_out + k * w, ak, y);
    }
  }
}

template <typename T>
void forward_unit(const Shape& s, const T* u, const T* delta, const T* A, const T* B, const T* C,
                  const bool* keep, const T* state, T* y, T* final_state, T* starts, bool save, int64_t i,
                  int64_t e0, int64_t e1) {
  const int64_t w = e1 - e0, n = s.n, d = s.d, gn = s.g * s.n;
  std::vector<T> h(n * w), dl(w), dlu(w), yt(w);
  for (int64_t k = 0; k < n; ++k) std::memcpy(&h[k * w], state + (i * n + k) * d + e0, w * sizeof(T));
  for (int64_t t = 0; t < s.T; ++t) {
    if (save && t % s.chunk == 0) {
      T* dst = starts + (i * s.chunks() + t / s.chunk) * n * d;
      for (int64_t k = 0; k < n; ++k) std::memcpy(dst + k * d + e0, &h[k * w], w * sizeof(T));
    }
    const int64_t row = i * s.T + t;
    load_token(s, u, delta, row, e0, w, dl.data(), dlu.data());
    std::fill(yt.begin(), yt.end(), T(0));
    step<T, false, true>(s, A, B + row * gn, C + row * gn, keep[row], e0, w, dl.data(), dlu.data(), h.data(),
                         h.data(), nullptr, yt.data());
    std::memcpy(y + row * d + e0, yt.data(), w * sizeof(T));
  }
  for (int64_t k = 0; k < n; ++k) std::memcpy(final_state + (i * n + k) * d + e0, &h[k * w], w * sizeof(T));
}

template <typename T>
void backward_unit(const Shape& s, const T* u, const T* delta, const T* A, const T* B, const T* C,
                   const bool* keep, const T* starts, const T* dy, const T* d_final, T* du, T* ddelta,
                   T* dA_rows, T* dB_part, T* dC_part, T* d_state, int64_t i, int64_t e0, int64_t e1) {
  const int64_t w = e1 - e0, n = s.n, d = s.d, gn = s.g * s.n, nw = n * w, per = s.per_group();
  std::vector<T> g(nw), dA(nw, T(0)), H((s.chunk + 1) * nw), decay(s.chunk * nw);
  std::vector<T> dl(w), dlu(w), d_in(w), dd(w);
  for (int64_t k = 0; k < n; ++k) std::memcpy(&g[k * w], d_final + (i * n + k) * d + e0, w * sizeof(T));
  for (int64_t j = s.chunks() - 1; j >= 0; --j) {
    const int64_t t0 = j * s.chunk, len = std::min(s.T, t0 + s.chunk) - t0;
    const T* start = starts + (i * s.chunks() + j) * n * d;
    for (int64_t k = 0; k < n; ++k) std::memcpy(&H[k * w], start + k * d + e0, w * sizeof(T));
    for (int64_t r = 0; r < len; ++r) {  // recompute the chunk's states and decays
      const int64_t row = i * s.T + t0 + r;
      load_token(s, u, delta, row, e0, w, dl.data(), dlu.data());
      step<T, true, false>(s, A, B + row * gn, nullptr, keep[row], e0, w, dl.data(), dlu.data(), &H[r * nw],
                           &H[(r + 1) * nw], &decay[r * nw], nullptr);
    }
    for (int64_t r = len - 1; r >= 0; --r) {  // walk it backwards
      const int64_t row = i * s.T + t0 + r;
      load_token(s, u, delta, row, e0, w, dl.data(), dlu.data());
      const T* dyt = dy + row * d + e0;
      const T* Bt = B + row * gn;
      const T* Ct = C + row * gn;
      T* dBt = dB_part + row * gn;
      T* dCt = dC_part + row * gn;
      std::fill(d_in.begin(), d_in.end(), T(0));
      std::fill(dd.begin(), dd.end(), T(0));
      for (int64_t k = 0; k < n; ++k) {
        const T* Ak = A + k * d + e0;
        const T* hp = &H[r * nw + k * w];
        const T* hx = &H[(r + 1) * nw + k * w];
        const T* ak = &decay[r * nw + k * w];
        T* gk = &g[k * w];
        T* dAk = &dA[k * w];
        for (int64_t gi = e0 / per; gi * per < e1; ++gi) {
          const int64_t s0 = std::max(e0, gi * per) - e0, s1 = std::min(e1, (gi + 1) * per) - e0;
          const T bk = Bt[gi * n + k], ck = Ct[gi * n + k];
          T sum_b = 0, sum_c = 0;
#pragma omp simd reduction(+ : sum_b, sum_c)
          for (int64_t e = s0; e < s1; ++e) {
            const T gx = gk[e] + dyt[e] * ck;  // cotangent of the state after the token
            sum_c += dyt[e] * hx[e];
            sum_b += gx * dlu[e];
            d_in[e] += gx * bk;
            const T d_exponent = gx * hp[e] * ak[e];
            dd[e] += d_exponent * Ak[e];
            dAk[e] += d_exponent * dl[e];
            gk[e] = ak[e] * gx;
          }
          dBt[gi * n + k] += sum_b;
          dCt[gi * n + k] += sum_c;
        }
      }
      const T* ut = u + row * d + e0;
      T* dut = du + row * d + e0;
      T* ddt = ddelta + row * d + e0;
      for (int64_t e = 0; e < w; ++e) {
        dut[e] = d_in[e] * dl[e];
        ddt[e] = dd[e] + d_in[e] * ut[e];
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    std::memcpy(d_state + (i * n + k) * d + e0, &g[k * w], w * sizeof(T));
    std::memcpy(dA_rows + (i * n + k) * d + e0, &dA[k * w], w * sizeof(T));
  }
}

ffi::Error check(const ffi::AnyBuffer& u, const ffi::AnyBuffer& A, const ffi::AnyBuffer& B, int64_t chunk,
                 Shape* s) {
  auto ud = u.dimensions(), Ad = A.dimensions(), Bd = B.dimensions();
  if (ud.size() != 3 || Ad.size() != 2 || Bd.size() != 4 || chunk < 1)
    return ffi::Error::InvalidArgument("selective scan kernel: bad ranks or chunk");
  *s = Shape{ud[0], ud[1], ud[2], Ad[0], Bd[2], chunk};
  if (Ad[1] != s->d || s->g < 1 || s->d % s->g)
    return ffi::Error::InvalidArgument("selective scan kernel: bad shapes");
  return ffi::Error::Success();
}

template <typename T>
ffi::Error forward_typed(ffi::ThreadPool pool, const Shape& s, ffi::AnyBuffer u, ffi::AnyBuffer delta,
                         ffi::AnyBuffer A, ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer keep,
                         ffi::AnyBuffer state, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> final_state, ffi::Result<ffi::AnyBuffer> starts,
                         bool save) {
  const int64_t threads = pool.num_threads(), blocks = channel_blocks(s);
  parallel_for(pool, s.b * blocks, threads, [&](int64_t unit) {
    int64_t e0, e1;
    block_range(s, blocks, unit % blocks, &e0, &e1);
    if (e1 <= e0) return;
    forward_unit<T>(s, data<T>(u), data<T>(delta), data<T>(A), data<T>(B), data<T>(C), data<bool>(keep),
                    data<T>(state), data<T>(y), data<T>(final_state), data<T>(starts), save, unit / blocks,
                    e0, e1);
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer delta, ffi::AnyBuffer A,
                   ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer keep, ffi::AnyBuffer state,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> final_state,
                   ffi::Result<ffi::AnyBuffer> starts, int64_t chunk, bool save) {
  Shape s;
  if (auto err = check(u, A, B, chunk, &s); err.failure()) return err;
  switch (u.element_type()) {
    case ffi::DataType::F32:
      return forward_typed<float>(pool, s, u, delta, A, B, C, keep, state, y, final_state, starts, save);
    case ffi::DataType::F64:
      return forward_typed<double>(pool, s, u, delta, A, B, C, keep, state, y, final_state, starts, save);
    default:
      return ffi::Error::InvalidArgument("selective scan kernel: float32 or float64 only");
  }
}

template <typename T>
ffi::Error backward_typed(ffi::ThreadPool pool, const Shape& s, ffi::AnyBuffer u, ffi::AnyBuffer delta,
                          ffi::AnyBuffer A, ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer keep,
                          ffi::AnyBuffer starts, ffi::AnyBuffer dy, ffi::AnyBuffer d_final,
                          ffi::Result<ffi::AnyBuffer> du, ffi::Result<ffi::AnyBuffer> ddelta,
                          ffi::Result<ffi::AnyBuffer> dA, ffi::Result<ffi::AnyBuffer> dB,
                          ffi::Result<ffi::AnyBuffer> dC, ffi::Result<ffi::AnyBuffer> d_state) {
  const int64_t threads = pool.num_threads(), blocks = channel_blocks(s);
  const int64_t bc = s.b * s.T * s.g * s.n;
  // Channel blocks of one row share the (row, token, group) sums of dB, dC: one partial per block.
  std::vector<T> part_b(blocks > 1 ? blocks * bc : 0, T(0)), part_c(part_b.size(), T(0));
  std::vector<T> dA_rows(s.b * s.n * s.d);
  T* out_b = data<T>(dB);
  T* out_c = data<T>(dC);
  if (blocks == 1) {
    std::fill(out_b, out_b + bc, T(0));
    std::fill(out_c, out_c + bc, T(0));
  }
  parallel_for(pool, s.b * blocks, threads, [&](int64_t unit) {
    const int64_t blk = unit % blocks;
    int64_t e0, e1;
    block_range(s, blocks, blk, &e0, &e1);
    if (e1 <= e0) return;
    T* pb = blocks > 1 ? part_b.data() + blk * bc : out_b;
    T* pc = blocks > 1 ? part_c.data() + blk * bc : out_c;
    backward_unit<T>(s, data<T>(u), data<T>(delta), data<T>(A), data<T>(B), data<T>(C), data<bool>(keep),
                     data<T>(starts), data<T>(dy), data<T>(d_final), data<T>(du), data<T>(ddelta),
                     dA_rows.data(), pb, pc, data<T>(d_state), unit / blocks, e0, e1);
  });
  if (blocks > 1) {
    for (int64_t x = 0; x < bc; ++x) {
      T sb = 0, sc = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        sb += part_b[blk * bc + x];
        sc += part_c[blk * bc + x];
      }
      out_b[x] = sb;
      out_c[x] = sc;
    }
  }
  T* out_a = data<T>(dA);
  const int64_t nd = s.n * s.d;
  std::fill(out_a, out_a + nd, T(0));
  for (int64_t i = 0; i < s.b; ++i)
    for (int64_t x = 0; x < nd; ++x) out_a[x] += dA_rows[i * nd + x];
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer u, ffi::AnyBuffer delta, ffi::AnyBuffer A,
                    ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer keep, ffi::AnyBuffer starts,
                    ffi::AnyBuffer dy, ffi::AnyBuffer d_final, ffi::Result<ffi::AnyBuffer> du,
                    ffi::Result<ffi::AnyBuffer> ddelta, ffi::Result<ffi::AnyBuffer> dA,
                    ffi::Result<ffi::AnyBuffer> dB, ffi::Result<ffi::AnyBuffer> dC,
                    ffi::Result<ffi::AnyBuffer> d_state, int64_t chunk) {
  Shape s;
  if (auto err = check(u, A, B, chunk, &s); err.failure()) return err;
  switch (u.element_type()) {
    case ffi::DataType::F32:
      return backward_typed<float>(pool, s, u, delta, A, B, C, keep, starts, dy, d_final, du, ddelta, dA, dB,
                                   dC, d_state);
    case ffi::DataType::F64:
      return backward_typed<double>(pool, s, u, delta, A, B, C, keep, starts, dy, d_final, du, ddelta, dA, dB,
                                    dC, d_state);
    default:
      return ffi::Error::InvalidArgument("selective scan kernel: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmjaxSelectiveScanForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // delta
                                  .Arg<ffi::AnyBuffer>()  // A
                                  .Arg<ffi::AnyBuffer>()  // B
                                  .Arg<ffi::AnyBuffer>()  // C
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Arg<ffi::AnyBuffer>()  // state
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // final state
                                  .Ret<ffi::AnyBuffer>()  // chunk start states
                                  .Attr<int64_t>("chunk")
                                  .Attr<bool>("save"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmjaxSelectiveScanBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // delta
                                  .Arg<ffi::AnyBuffer>()  // A
                                  .Arg<ffi::AnyBuffer>()  // B
                                  .Arg<ffi::AnyBuffer>()  // C
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Arg<ffi::AnyBuffer>()  // chunk start states
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // d final state
                                  .Ret<ffi::AnyBuffer>()  // du
                                  .Ret<ffi::AnyBuffer>()  // ddelta
                                  .Ret<ffi::AnyBuffer>()  // dA
                                  .Ret<ffi::AnyBuffer>()  // dB
                                  .Ret<ffi::AnyBuffer>()  // dC
                                  .Ret<ffi::AnyBuffer>()  // d initial state
                                  .Attr<int64_t>("chunk"));
