// Log-domain Sinkhorn with a dustbin row (docs/method.md, "Matching network") on the CPU: forward with
// the potentials of every iteration saved, and the backward as a reverse
// replay of the unrolled iterations from those potentials.
//
// Layout of one problem: Z is (M + 1) x N, rows 0..M-1 are the scores and
// row M (the dustbin) holds bin_score in every column. Rows that are "on"
// (valid rows and the dustbin) take part in the transport; invalid rows keep
// u = 0 and are left out of every column sum. Problems are independent, so
// the batch is split over threads with at::parallel_for; every inner loop
// runs along the contiguous column axis.
//
// Speed: the cost is exp, (M + 1) x N of them per pass. What makes it cheap:
//  * exp (and log) are written as branch-free range reduction + polynomial
//    (vexp/vlog below), so GCC vectorises the loops that call them; the
//    libm calls it would otherwise make are scalar. The hot functions are
//    compiled for AVX-512, AVX2 and the baseline (isa.h), since the
//    extension itself is built for baseline x86-64.
//  * one exp per element per iteration instead of two. Forward: the row
//    step's terms, scaled by mu_r / (row sum), are the row-normalised plan
//    P[r, c] = exp(Z + v_{t-1} + u_t), and the column step needs only its
//    column sums: LSE_r(Z + u_t)[c] = log(sum_r P[r, c]) - v_{t-1}[c].
//    Backward: the row-step softmax of iteration t is the column-step one
//    times exp(v_{t-1}[c] - v_t[c]) / (N mu_r). Both identities are exact;
//    each is used only where it cannot lose accuracy to underflow (checked
//    per iteration), otherwise the direct two-exp computation runs.
//  * reductions keep kLanes independent partial results, so they vectorise
//    without -ffast-math (which the build does not use), over rows padded
//    to whole vectors (no scalar tails); the forward's row max is skipped
//    when the previous iteration's LSE is a safe shift.
//  * problems are handed to the threads one at a time (2 shared cores).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "escape_fast.h"
#include "isa.h"
#include "sinkhorn_common.h"

namespace escape_fast {
namespace {

// Helpers are inlined into each ISA variant (isa.h) so that it vectorises
// them for its own instruction set.
#define SINKHORN_INLINE ESCAPE_FAST_INLINE

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Independent partial results per reduction, and the unit rows are padded
// to: 64 bytes, one AVX-512 or two AVX2 vectors.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

// --------------------------------------------------------------------------
// vectorisable exp and log
// --------------------------------------------------------------------------
template <typename T>
struct MathConsts;

template <>
struct MathConsts<float> {
  using Bits = uint32_t;
  static constexpr int kMantissa = 23, kBias = 127;
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: x + kMagic rounds x to an integer in the low bits
  // Cody-Waite split of ln 2: kLn2Hi has 9 significant bits, so n * kLn2Hi
  // is exact for |n| < 2^15.
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // exp(x) rounds to 0 below kExpLo and overflows above kExpHi: clamping x
  // at kExpLo keeps 2^n in range and gives exactly 0.
  static constexpr float kExpLo = -104.0f, kExpHi = 88.8f;
  static constexpr int kExpDegree = 7;   // Taylor on |r| <= ln2 / 2: truncation < 0.1 ulp
  static constexpr int kLogTerms = 5;    // atanh series, |s| <= 0.172: truncation < 0.05 ulp
  static constexpr Bits kSqrtHalf = 0x3f3504f3u, kOne = 0x3f800000u, kMantissaMask = 0x007fffffu;
};

template <>
struct MathConsts<double> {
  using Bits = uint64_t;
  static constexpr int kMantissa = 52, kBias = 1023;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kExpLo = -746.0, kExpHi = 709.9;
  static constexpr int kExpDegree = 13;
  static constexpr int kLogTerms = 11;
  static constexpr Bits kSqrtHalf = 0x3fe6a09e667f3bcdull, kOne = 0x3ff0000000000000ull,
                        kMantissaMask = 0x000fffffffffffffull;
};

// 2^k for an integer-valued k in [-kBias + 1, kBias]: k + kMagic + kBias
// holds k + kBias in its low mantissa bits, and the shift moves them into
// the exponent field (the bits above it fall off the top).
template <typename T>
SINKHORN_INLINE T pow2i(T k) {
  using C = MathConsts<T>;
  using Bits = typename C::Bits;
  return std::bit_cast<T>(Bits(std::bit_cast<Bits>(k + (C::kMagic + T(C::kBias))) << C::kMantissa));
}

// c ? a : b on the bit patterns. GCC turns a floating-point ?: whose arm is
// a constant into a branch around the arithmetic it feeds, which only
// AVX-512 (masked operations) can vectorise again; integer masks keep the
// loops straight-line for AVX2 and SSE2 as well.
template <typename T>
SINKHORN_INLINE T select(bool c, T a, T b) {
  using Bits = typename MathConsts<T>::Bits;
  const Bits m = Bits(0) - Bits(c);
  return std::bit_cast<T>((std::bit_cast<Bits>(a) & m) | (std::bit_cast<Bits>(b) & ~m));
}

// exp(x) to ~1.2 ulp, branch-free: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its Taylor polynomial, times 2^n applied as two factors
// 2^h 2^(n-h) so that results in the subnormal range come out right.
// exp(-inf) = 0, exp(+inf) = inf, NaN propagates (it passes the clamp and
// the polynomial).
template <typename T>
SINKHORN_INLINE T vexp(T x) {
  using C = MathConsts<T>;
  const T xc = select(x < C::kExpLo, C::kExpLo, x);  // keeps 2^n in range
  const T n = (xc * T(1.4426950408889634) + C::kMagic) - C::kMagic;  // round(x / ln2)
  const T r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
  T inv_fact[C::kExpDegree + 1];  // 1 / k!, folded to constants by the compiler
  inv_fact[0] = 1;
  for (int k = 1; k <= C::kExpDegree; ++k) inv_fact[k] = inv_fact[k - 1] / T(k);
  T p = inv_fact[C::kExpDegree];
  for (int k = C::kExpDegree - 1; k >= 0; --k) p = p * r + inv_fact[k];
  const T h = (n * T(0.5) + C::kMagic) - C::kMagic;
  const T y = p * pow2i(h) * pow2i(n - h);
  return select(x > C::kExpHi, std::numeric_limits<T>::infinity(), y);
}

// log(x) to ~1 ulp for a positive normal finite x (callers route the other
// values to std::log): x = 2^k m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172.
template <typename T>
SINKHORN_INLINE T vlog(T x) {
  using C = MathConsts<T>;
  using Bits = typename C::Bits;
  // Offsetting the bits by 1 - sqrt(1/2) moves the octave boundary to
  // sqrt(1/2); the exponent field then holds k + bias.
  const Bits d = std::bit_cast<Bits>(x) + (C::kOne - C::kSqrtHalf);
  const T k = std::bit_cast<T>((d >> C::kMantissa) | std::bit_cast<Bits>(T(C::kMagic))) - C::kMagic - T(C::kBias);
  const T m = std::bit_cast<T>((d & C::kMantissaMask) + C::kSqrtHalf);
  const T f = m - T(1);  // exact (Sterbenz)
  const T s = f / (f + T(2));
  const T s2 = s * s;
  // 2 atanh(s) = 2s + 2s^3 q with q = 1/3 + s^2/5 + ..., and 2s = f - s f:
  // the exact f comes first and only a small correction carries rounding.
  T q = T(1) / T(2 * C::kLogTerms - 1);
  for (int j = C::kLogTerms - 2; j >= 1; --j) q = q * s2 + T(1) / T(2 * j + 1);
  const T log_m = f - s * (f - T(2) * s2 * q);
  return k * C::kLn2Hi + (log_m + k * C::kLn2Lo);
}

// --------------------------------------------------------------------------
// reductions along a row with kLanes partial results
// --------------------------------------------------------------------------
// Pairwise combination of the W partial results: log2(W) vectorised steps
// instead of a chain of W dependent scalar operations.
template <typename T, typename Op>
SINKHORN_INLINE T reduce_lanes(T* acc, Op op) {
  for (int64_t w = kLanes<T> / 2; w >= 1; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] = op(acc[j], acc[j + w]);
  }
  return acc[0];
}

// sum_c x_c
template <typename T>
SINKHORN_INLINE T sum(const T* x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  T acc[W] = {};
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    for (int64_t j = 0; j < W; ++j) acc[j] += x[c + j];
  }
  for (; c < n; ++c) acc[0] += x[c];
  return reduce_lanes(acc, [](T a, T b) { return a + b; });
}

// The hot reductions run over scratch rows padded with zeros to a multiple
// of kLanes (see padded()), so they need no scalar tail.
inline int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

// sum_c x_c for n a multiple of kLanes
template <typename T>
SINKHORN_INLINE T sum_padded(const T* x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  T acc[W] = {};
  for (int64_t c = 0; c < n; c += W) {
    for (int64_t j = 0; j < W; ++j) acc[j] += x[c + j];
  }
  return reduce_lanes(acc, [](T a, T b) { return a + b; });
}

// max_c (x_c + y_c) for n a multiple of kLanes; NaN terms are skipped like
// std::max does (they reach the sum that follows anyway).
template <typename T>
SINKHORN_INLINE T max_of_sum(const T* x, const T* y, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  T acc[W];
  for (int64_t j = 0; j < W; ++j) acc[j] = kNegInf<T>;
  for (int64_t c = 0; c < n; c += W) {
    for (int64_t j = 0; j < W; ++j) acc[j] = std::max(acc[j], x[c + j] + y[c + j]);
  }
  return reduce_lanes(acc, [](T a, T b) { return std::max(a, b); });
}

// sum_c x_c y_c for n a multiple of kLanes
template <typename T>
SINKHORN_INLINE T dot_padded(const T* x, const T* y, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  T acc[W] = {};
  for (int64_t c = 0; c < n; c += W) {
    for (int64_t j = 0; j < W; ++j) acc[j] += x[c + j] * y[c + j];
  }
  return reduce_lanes(acc, [](T a, T b) { return a + b; });
}

// e_c = exp(x_c + y_c + a) for c < n
template <typename T>
SINKHORN_INLINE void exp_of_sum(const T* x, const T* y, T a, T* e, int64_t n) {
  for (int64_t c = 0; c < n; ++c) e[c] = vexp(x[c] + y[c] + a);
}

// log(sum_c exp(x_c + y_c)) over padded rows (n a multiple of kLanes); -inf
// when every term is -inf (the shift falls back to 0 so that no -inf - -inf
// = NaN appears). e: scratch row.
template <typename T>
SINKHORN_INLINE T row_logsumexp(const T* x, const T* y, T* e, int64_t n) {
  const T m = max_of_sum(x, y, n);
  const T shift = m == kNegInf<T> ? T(0) : m;
  exp_of_sum(x, y, -shift, e, n);
  return shift + std::log(sum_padded(e, n));
}

// out_c = base_c - log(x_c): vlog where it is valid, std::log elsewhere
// (0, subnormal, inf, NaN).
template <typename T>
SINKHORN_INLINE void sub_log(const T* base, const T* x, T* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] = base[c] - vlog(x[c]);
  for (int64_t c = 0; c < n; ++c) {
    if (!(x[c] >= std::numeric_limits<T>::min() && x[c] <= std::numeric_limits<T>::max())) {
      out[c] = base[c] - std::log(x[c]);
    }
  }
}

// --------------------------------------------------------------------------
// one problem
// --------------------------------------------------------------------------
// One problem's Z (scores and the dustbin row) copied with its rows padded
// to NP, a multiple of kLanes, plus its marginals. The padding columns hold
// 0 and are paired with potentials of -inf (see pad()), so their terms are
// exp(-inf) = 0: the exp loops and the reductions then run over whole
// vectors, with no scalar tail.
template <typename T>
struct Problem {
  int64_t M, N, NP;
  T log_n;
  std::vector<T> log_mu;    // [M + 1]
  std::vector<T> mu;        // [M + 1], exp(log_mu)
  std::vector<char> on;     // [M + 1]
  std::vector<T> zp;        // [M + 1, NP]

  Problem(int64_t M_, int64_t N_)
      : M(M_), N(N_), NP(padded(N_, kLanes<T>)), log_n(std::log(T(N_))), log_mu(M_ + 1), mu(M_ + 1), on(M_ + 1),
        zp((M_ + 1) * NP, T(0)) {}

  void load(const T* z, const bool* valid, T bin) {
    int64_t m_valid = 0;
    for (int64_t r = 0; r < M; ++r) {
      on[r] = valid[r];
      m_valid += valid[r] ? 1 : 0;
      log_mu[r] = -log_n;
      mu[r] = T(1) / T(N);
      std::copy(z + r * N, z + (r + 1) * N, zp.begin() + r * NP);
    }
    on[M] = 1;
    // log(max(N - M_valid, 0)) - log N: -inf when the keypoints fill every column.
    const T bin_mass = std::max(T(N - m_valid), T(0));
    log_mu[M] = std::log(bin_mass) - log_n;
    mu[M] = bin_mass / T(N);
    std::fill(zp.begin() + M * NP, zp.begin() + M * NP + N, bin);
  }

  const T* row(int64_t r) const { return zp.data() + r * NP; }

  // a column potential row [NP]: v[0, N) from src, -inf in the padding
  void pad(const T* src, T* v) const {
    std::copy(src, src + N, v);
    std::fill(v + N, v + NP, kNegInf<T>);
  }
};

// Below this, a column sum of the row-normalised plan may have lost
// relative accuracy to terms that underflowed (each < the smallest normal
// number, (M + 1) of them): the fused column step then falls back to the
// direct one. The same bounds [sqrt(min), sqrt(max)] accept a row sum taken
// with a guessed shift (below).
template <typename T>
const T kSqrtMin = std::sqrt(std::numeric_limits<T>::min());
template <typename T>
const T kSqrtMax = std::sqrt(std::numeric_limits<T>::max());

template <typename T>
struct ForwardArgs {
  const T* z;
  const T* bin_score;
  const bool* valid;
  int64_t B, M, N, iters;
  T* out;
  T* u_hist;
  T* v_hist;
};

template <typename T>
SINKHORN_INLINE void forward_problems_body(const ForwardArgs<T>& a, std::atomic<int64_t>& next) {
  const int64_t M = a.M, N = a.N, iters = a.iters;
  Problem<T> p(M, N);
  const int64_t NP = p.NP;
  std::vector<T> u(M + 1), v(NP), e(NP), col(N), col_max(N), shift(M + 1), row_sum(M + 1), base(std::max(M + 1, N));
  for (int64_t b = next++; b < a.B; b = next++) {
    p.load(a.z + b * M * N, a.valid + b * M, a.bin_score[b]);
    std::fill(u.begin(), u.end(), T(0));
    std::fill(v.begin(), v.begin() + N, T(0));
    std::fill(v.begin() + N, v.end(), kNegInf<T>);  // padding (see Problem)
    for (int64_t t = 0; t < iters; ++t) {
      // row step, u_r = log_mu_r - LSE_c(Z_rc + v_c) on the on rows, and the
      // column sums of the row-normalised plan P = exp(Z + v + u) =
      // mu_r e_c / row_sum with e_c = exp(Z_rc + v_c - shift_r).
      std::fill(col.begin(), col.end(), T(0));
      bool fused = true;
      for (int64_t r = 0; r <= M; ++r) {
        if (!p.on[r]) continue;
        const T* zr = p.row(r);
        // The shift only has to keep the terms and their sum in range. The
        // previous iteration's LSE (log_mu - u, u not yet overwritten) is
        // close once the iterations settle and saves the pass for the max;
        // the exact max is used at t = 0 and whenever the sum lands outside
        // [sqrt(min), sqrt(max)], where underflow could cost accuracy.
        bool done = false;
        if (t > 0) {
          const T guess = p.log_mu[r] - u[r];
          if (std::isfinite(guess)) {
            exp_of_sum(zr, v.data(), -guess, e.data(), NP);
            row_sum[r] = sum_padded(e.data(), NP);
            shift[r] = guess;
            done = row_sum[r] >= kSqrtMin<T> && row_sum[r] <= kSqrtMax<T>;
          }
        }
        if (!done) {
          const T m = max_of_sum(zr, v.data(), NP);
          shift[r] = m == kNegInf<T> ? T(0) : m;
          exp_of_sum(zr, v.data(), -shift[r], e.data(), NP);
          row_sum[r] = sum_padded(e.data(), NP);
        }
        const T w = p.mu[r] / row_sum[r];
        if (!(w <= std::numeric_limits<T>::max())) {
          fused = false;  // an all -inf row: inf or NaN weight
        } else if (w != 0) {
          for (int64_t c = 0; c < N; ++c) col[c] += w * e[c];
        }
      }
      for (int64_t r = 0; r <= M; ++r) base[r] = p.on[r] ? p.log_mu[r] - shift[r] : T(0);
      sub_log(base.data(), row_sum.data(), u.data(), M + 1);
      for (int64_t r = 0; r <= M; ++r) u[r] = p.on[r] ? u[r] : T(0);
      // column step, v_c = -log N - LSE_{on r}(Z_rc + u_r)
      //                  = v_c - log N - log(sum_r P_rc)
      if (fused) {
        int bad = 0;
        for (int64_t c = 0; c < N; ++c) bad |= (col[c] >= kSqrtMin<T>) & (col[c] <= T(M + 1)) ? 0 : 1;
        fused = bad == 0;
      }
      if (fused) {
        for (int64_t c = 0; c < N; ++c) base[c] = v[c] - p.log_n;
        sub_log(base.data(), col.data(), v.data(), N);
      } else {
        // direct: running max, then sum of exp, over the on rows
        std::fill(col_max.begin(), col_max.end(), kNegInf<T>);
        for (int64_t r = 0; r <= M; ++r) {
          if (!p.on[r]) continue;
          const T* zr = p.row(r);
          const T ur = u[r];
          for (int64_t c = 0; c < N; ++c) col_max[c] = std::max(col_max[c], zr[c] + ur);
        }
        for (int64_t c = 0; c < N; ++c) {
          if (col_max[c] == kNegInf<T>) col_max[c] = 0;  // all terms -inf: sum 0, lse -inf
          col[c] = 0;
        }
        for (int64_t r = 0; r <= M; ++r) {
          if (!p.on[r]) continue;
          const T* zr = p.row(r);
          const T ur = u[r];
          for (int64_t c = 0; c < N; ++c) col[c] += vexp(zr[c] + ur - col_max[c]);
        }
        for (int64_t c = 0; c < N; ++c) base[c] = -p.log_n - col_max[c];
        sub_log(base.data(), col.data(), v.data(), N);
      }
      std::copy(u.begin(), u.end(), a.u_hist + (b * iters + t) * (M + 1));
      std::copy(v.begin(), v.begin() + N, a.v_hist + (b * iters + t) * N);
    }
    T* out = a.out + b * (M + 1) * N;
    for (int64_t r = 0; r <= M; ++r) {
      const T* zr = p.row(r);
      const T ur = u[r];
      for (int64_t c = 0; c < N; ++c) out[r * N + c] = zr[c] + ur + v[c] + p.log_n;
    }
  }
}

ESCAPE_FAST_ISA_VARIANTS(forward_problems, (const ForwardArgs<float>& a, std::atomic<int64_t>& next), (a, next))
ESCAPE_FAST_ISA_VARIANTS(forward_problems, (const ForwardArgs<double>& a, std::atomic<int64_t>& next), (a, next))

template <typename T>
struct BackwardArgs {
  const T* grad;
  const T* z;
  const T* bin_score;
  const bool* valid;
  const T* u_hist;
  const T* v_hist;
  int64_t B, M, N, iters;
  T* grad_scores;
  T* grad_bin_score;
};

// Largest v_{t-1} - v_t for which the backward takes the row-step softmax
// from the column-step one (times exp(v_{t-1} - v_t) <= 1 / sqrt(min)): a
// column-step term lost to underflow then costs at most sqrt(min) there.
template <typename T>
const T kMaxColumnShift = -std::log(std::numeric_limits<T>::min()) / 2;

template <typename T>
SINKHORN_INLINE void backward_problems_body(const BackwardArgs<T>& a, std::atomic<int64_t>& next) {
  const int64_t M = a.M, N = a.N, iters = a.iters;
  Problem<T> p(M, N);
  // rows of NP: the potentials padded with -inf (see Problem), the rest
  // with zeros for dot_padded / sum_padded
  const int64_t NP = p.NP;
  std::vector<T> du(M + 1), dv(NP), dv_prev(NP), zeros(N, T(0)), dz_bin(N), pc(NP), beta(N), e(NP), v(NP), vp(NP);
  for (int64_t b = next++; b < a.B; b = next++) {
    const T* g = a.grad + b * (M + 1) * N;
    p.load(a.z + b * M * N, a.valid + b * M, a.bin_score[b]);
    // dZ rows 0..M-1 accumulate in the output, the dustbin row in dz_bin.
    T* dz = a.grad_scores + b * M * N;
    auto dz_row = [&](int64_t r) { return r < M ? dz + r * N : dz_bin.data(); };
    // The output log_p = Z + u + v + log N: dZ starts at grad, du_T is the
    // row sum on the on rows (invalid rows have u fixed at 0), dv_T the
    // column sum over all rows.
    std::fill(dv.begin(), dv.end(), T(0));
    for (int64_t r = 0; r <= M; ++r) {
      const T* gr = g + r * N;
      T* dzr = dz_row(r);
      std::copy(gr, gr + N, dzr);
      for (int64_t c = 0; c < N; ++c) dv[c] += gr[c];
      du[r] = p.on[r] ? sum(gr, N) : T(0);
    }
    for (int64_t t = iters; t >= 1; --t) {
      const T* u = a.u_hist + (b * iters + t - 1) * (M + 1);
      p.pad(a.v_hist + (b * iters + t - 1) * N, v.data());
      p.pad(t >= 2 ? a.v_hist + (b * iters + t - 2) * N : zeros.data(), vp.data());
      // Row-step softmax Pr = exp(Z + v_{t-1} + u_t - log_mu) from the
      // column-step one Pc = exp(Z + u_t + v_t + log N):
      // Pr = Pc beta_c gamma_r, beta_c = exp(v_{t-1} - v_t), gamma_r = 1 / (N mu_r).
      int bad = 0;
      for (int64_t c = 0; c < N; ++c) {
        beta[c] = vp[c] - v[c];
        bad |= beta[c] <= kMaxColumnShift<T> ? 0 : 1;  // also NaN
      }
      const bool fused = bad == 0;
      if (fused) {
        for (int64_t c = 0; c < N; ++c) beta[c] = vexp(beta[c]);
      }
      std::fill(dv_prev.begin(), dv_prev.end(), T(0));
      for (int64_t r = 0; r <= M; ++r) {
        if (!p.on[r]) continue;
        const T* zr = p.row(r);
        T* dzr = dz_row(r);
        // column step of iteration t: Pc = exp(Z + u_t + v_t + log N), the
        // softmax over on rows whose normaliser v_t already holds.
        exp_of_sum(zr, v.data(), u[r] + p.log_n, pc.data(), NP);
        const T dur = du[r] - dot_padded(dv.data(), pc.data(), NP);
        if (fused && p.log_mu[r] != kNegInf<T>) {
          const T q = dur * std::exp(-(p.log_mu[r] + p.log_n));  // dur gamma_r
          for (int64_t c = 0; c < N; ++c) {
            const T gr = q * (beta[c] * pc[c]);  // dur Pr
            dzr[c] -= dv[c] * pc[c] + gr;
            dv_prev[c] -= gr;
          }
        } else {
          // direct row step: Pr = softmax_c(Z + v_{t-1}); its normaliser is
          // log_mu - u_t, except where log_mu = -inf (a dustbin with no
          // mass) and it has to be recomputed.
          const T lse = p.log_mu[r] == kNegInf<T> ? row_logsumexp(zr, vp.data(), e.data(), NP) : p.log_mu[r] - u[r];
          for (int64_t c = 0; c < N; ++c) {
            const T gr = dur * vexp(zr[c] + vp[c] - lse);
            dzr[c] -= dv[c] * pc[c] + gr;
            dv_prev[c] -= gr;
          }
        }
      }
      std::swap(dv, dv_prev);
      std::fill(du.begin(), du.end(), T(0));  // u_{t-1} only feeds v_{t-1}
    }
    a.grad_bin_score[b] = sum(dz_bin.data(), N);
  }
}

ESCAPE_FAST_ISA_VARIANTS(backward_problems, (const BackwardArgs<float>& a, std::atomic<int64_t>& next), (a, next))
ESCAPE_FAST_ISA_VARIANTS(backward_problems, (const BackwardArgs<double>& a, std::atomic<int64_t>& next), (a, next))

// Runs work(next) on every thread of at::parallel_for, where work takes
// problems one at a time from the shared counter: unlike parallel_for's
// fixed equal ranges this keeps both cores busy when one thread is slowed
// by other load on the machine. (A range that runs inline or serially just
// finds the counter exhausted.)
template <typename F>
void for_each_problem(int64_t B, const F& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, B, 1, [&](int64_t, int64_t) { work(next); });
}

// --------------------------------------------------------------------------
// ops
// --------------------------------------------------------------------------
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_cpu(const at::Tensor& scores, const at::Tensor& bin_score,
                                                                const at::Tensor& valid, int64_t iters) {
  for (const auto* t : {&scores, &bin_score, &valid}) {
    TORCH_CHECK(t->device().is_cpu(), "sinkhorn_log (CPU kernel): all tensors must be on the CPU");
  }
  auto f = sinkhorn::Forward::make(scores, bin_score, valid, iters);
  if (f.B == 0) return {f.log_p, f.u_hist, f.v_hist};
  ESCAPE_FAST_DISPATCH_FLOATING(f.scores.scalar_type(), "sinkhorn_log_cpu", [&] {
    const ForwardArgs<scalar_t> args{f.scores.data_ptr<scalar_t>(), f.bin_score.data_ptr<scalar_t>(),
                                     f.valid.data_ptr<bool>(),       f.B,
                                     f.M,                            f.N,
                                     f.iters,                        f.log_p.data_ptr<scalar_t>(),
                                     f.u_hist.data_ptr<scalar_t>(),  f.v_hist.data_ptr<scalar_t>()};
    for_each_problem(f.B, [&](std::atomic<int64_t>& next) { forward_problems(args, next); });
  });
  return {f.log_p, f.u_hist, f.v_hist};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_backward_cpu(const at::Tensor& grad, const at::Tensor& scores,
                                                             const at::Tensor& bin_score, const at::Tensor& valid,
                                                             const at::Tensor& u_hist, const at::Tensor& v_hist) {
  for (const auto* t : {&grad, &scores, &bin_score, &valid, &u_hist, &v_hist}) {
    TORCH_CHECK(t->device().is_cpu(), "sinkhorn_log_backward (CPU kernel): all tensors must be on the CPU");
  }
  auto b = sinkhorn::Backward::make(grad, scores, bin_score, valid, u_hist, v_hist);
  if (b.B == 0) return {b.grad_scores, b.grad_bin_score};
  ESCAPE_FAST_DISPATCH_FLOATING(b.scores.scalar_type(), "sinkhorn_log_backward_cpu", [&] {
    const BackwardArgs<scalar_t> args{b.grad.data_ptr<scalar_t>(),   b.scores.data_ptr<scalar_t>(),
                                      b.bin_score.data_ptr<scalar_t>(),   b.valid.data_ptr<bool>(),
                                      b.u_hist.data_ptr<scalar_t>(), b.v_hist.data_ptr<scalar_t>(),
                                      b.B,                           b.M,
                                      b.N,                           b.iters,
                                      b.grad_scores.data_ptr<scalar_t>(), b.grad_bin_score.data_ptr<scalar_t>()};
    for_each_problem(b.B, [&](std::atomic<int64_t>& next) { backward_problems(args, next); });
  });
  return {b.grad_scores, b.grad_bin_score};
}

// This file's ops on the CPU dispatch key (the schema is csrc/ops.cpp's); an op without
// a CPU kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CPU, m) {
  m.impl("sinkhorn_log", &sinkhorn_log_cpu);
  m.impl("sinkhorn_log_backward", &sinkhorn_log_backward_cpu);
}

}  // namespace escape_fast
