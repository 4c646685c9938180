// Log-domain Sinkhorn with a dustbin row (docs/method.md, "Matching network") on CUDA.
//
// One launch runs every iteration of a batch: one block per problem, which
// keeps the potentials u [M + 1] and v [N] in shared memory and synchronises
// between the row and column steps with __syncthreads (an iteration is far
// too short to pay for a kernel launch or a grid-wide barrier).
//
// Z (M + 1 rows x N columns) is read many times per iteration, so as many of
// its score rows as fit go to shared memory (dynamic, up to the opt-in limit,
// ~227 KB per block on H100); the remaining rows stream from global memory,
// where the whole batch's scores stay resident in L2 across iterations. The
// dustbin row is the constant bin_score and is never stored. Both kinds of
// row are read along the contiguous column axis, so the code is one path:
//
// * row step (logsumexp over columns): one warp per row, the lanes stride
//   the columns (coalesced) with an online max + sum, then a shuffle merge;
// * column step (logsumexp over the on rows): one thread per column. When
//   N < blockDim, the block splits the rows into G = blockDim / N groups
//   whose partial results meet in shared memory, so that small N still
//   keeps every thread busy.
//
// The backward replays the iterations in reverse from the saved potentials,
// recomputing each softmax from Z: the column softmax of iteration t is
// exp(Z + u_t + v_t + log N) (v_t holds its normaliser) and the row softmax
// exp(Z + v_{t-1} - (log_mu - u_t)); only a dustbin row with no mass
// (log_mu = -inf) needs its normaliser recomputed. All reductions have a
// fixed order, so results are deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "escape_fast.h"
#include "sinkhorn_common.h"

namespace escape_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float ef_exp(float x) { return expf(x); }
__device__ __forceinline__ double ef_exp(double x) { return exp(x); }
__device__ __forceinline__ float ef_log(float x) { return logf(x); }
__device__ __forceinline__ double ef_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Online logsumexp: running max m and sum s of exp(x - m). -inf terms are
// skipped so that no -inf - -inf = NaN ever appears; an empty or all -inf
// accumulator gives -inf.
template <typename T>
struct LseAcc {
  T m, s;
  __device__ LseAcc() : m(neg_inf<T>()), s(0) {}
  __device__ void push(T x) {
    if (x > m) {
      s = s * ef_exp(m - x) + T(1);
      m = x;
    } else if (x != neg_inf<T>()) {
      s += ef_exp(x - m);
    }
  }
  __device__ void merge(const LseAcc& o) {
    const T mm = m > o.m ? m : o.m;
    if (mm == neg_inf<T>()) return;
    s = s * ef_exp(m - mm) + o.s * ef_exp(o.m - mm);
    m = mm;
  }
  __device__ T value() const { return m == neg_inf<T>() ? m : m + ef_log(s); }
  __device__ void shuffle_merge(int offset) {
    LseAcc o;
    o.m = __shfl_xor_sync(0xffffffffu, m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, s, offset);
    merge(o);
  }
};

template <typename T>
struct SumAcc {
  T s;
  __device__ SumAcc() : s(0) {}
  __device__ void push(T x) { s += x; }
  __device__ void merge(const SumAcc& o) { s += o.s; }
  __device__ void shuffle_merge(int offset) { s += __shfl_xor_sync(0xffffffffu, s, offset); }
};

// Butterfly merge: every lane ends with the warp's total.
template <typename Acc>
__device__ __forceinline__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) a.shuffle_merge(offset);
  return a;
}

// For every column c < N: reduce term(r, c) over rows r < R into an Acc and
// hand it to out(c, acc). With G > 1 (N < blockDim) thread (g, c) takes rows
// g, g + G, ... and the G partials meet in part [G * N]. Called by the whole
// block (G is uniform); part may be reused only after a later __syncthreads.
template <typename Acc, typename Term, typename Out>
__device__ __forceinline__ void column_reduce(int R, int N, int G, Acc* part, Term term, Out out) {
  const int tid = threadIdx.x;
  if (G == 1) {
    for (int c = tid; c < N; c += blockDim.x) {
      Acc a;
      for (int r = 0; r < R; ++r) a.push(term(r, c));
      out(c, a);
    }
  } else {
    const int g = tid / N, c = tid - g * N;
    if (g < G) {
      Acc a;
      for (int r = g; r < R; r += G) a.push(term(r, c));
      part[g * N + c] = a;
    }
    __syncthreads();
    for (int c2 = tid; c2 < N; c2 += blockDim.x) {
      Acc a = part[c2];
      for (int k = 1; k < G; ++k) a.merge(part[k * N + c2]);
      out(c2, a);
    }
  }
}

// Marks the on rows (valid rows + the dustbin) and sets the log marginals:
// -log N for a keypoint row, log(max(N - M_valid, 0)) - log N for the dustbin.
template <typename T>
__device__ void setup_rows(const bool* valid_b, int M, int N, bool* on, T* log_mu) {
  int m_valid = 0;
  for (int base = 0; base < M; base += blockDim.x) {  // uniform trip count
    const int r = base + threadIdx.x;
    const bool on_r = r < M && valid_b[r];
    if (r < M) on[r] = on_r;
    m_valid += __syncthreads_count(on_r);
  }
  const T log_n = ef_log(T(N));
  for (int r = threadIdx.x; r <= M; r += blockDim.x) {
    if (r < M) {
      log_mu[r] = -log_n;
    } else {
      const T mass = N > m_valid ? T(N - m_valid) : T(0);
      log_mu[r] = ef_log(mass) - log_n;  // log(0) = -inf: a dustbin with no mass
      on[r] = true;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    sinkhorn_forward_kernel(const T* __restrict__ scores, const T* __restrict__ bin_score, const bool* __restrict__ valid,
                            int M, int N, int iters, int rows_smem, int G, T* __restrict__ log_p,
                            T* __restrict__ u_hist, T* __restrict__ v_hist) {
  // shared layout: Z rows [rows_smem * N] | v [N] | u [M+1] | log_mu [M+1] | part [G*N] | on [M+1]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sz = reinterpret_cast<T*>(smem_raw);
  T* v = sz + static_cast<int64_t>(rows_smem) * N;
  T* u = v + N;
  T* log_mu = u + (M + 1);
  LseAcc<T>* part = reinterpret_cast<LseAcc<T>*>(log_mu + (M + 1));
  bool* on = reinterpret_cast<bool*>(part + (G > 1 ? G * N : 0));

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const T* z = scores + static_cast<int64_t>(b) * M * N;
  const T bin = bin_score[b];
  const T log_n = ef_log(T(N));
  T* uh = u_hist + static_cast<int64_t>(b) * iters * (M + 1);
  T* vh = v_hist + static_cast<int64_t>(b) * iters * N;

  for (int64_t i = tid; i < static_cast<int64_t>(rows_smem) * N; i += blockDim.x) sz[i] = z[i];
  setup_rows<T>(valid + static_cast<int64_t>(b) * M, M, N, on, log_mu);
  for (int r = tid; r <= M; r += blockDim.x) u[r] = T(0);
  for (int c = tid; c < N; c += blockDim.x) v[c] = T(0);
  __syncthreads();

  // Z[r, c] for r < M (row M, the dustbin, is the constant bin).
  auto zrow = [&](int r) -> const T* {
    return r < rows_smem ? sz + static_cast<int64_t>(r) * N : z + static_cast<int64_t>(r) * N;
  };

  for (int t = 0; t < iters; ++t) {
    // row step: u_r = log_mu_r - logsumexp_c(Z_rc + v_c), one warp per row
    for (int r = warp; r <= M; r += nwarps) {
      T ur = T(0);
      if (on[r]) {  // uniform over the warp
        LseAcc<T> acc;
        if (r < M) {
          const T* zr = zrow(r);
          for (int c = lane; c < N; c += kWarp) acc.push(zr[c] + v[c]);
        } else {
          for (int c = lane; c < N; c += kWarp) acc.push(bin + v[c]);
        }
        acc = warp_merge(acc);
        ur = log_mu[r] - acc.value();
      }
      if (lane == 0) {
        u[r] = ur;
        uh[static_cast<int64_t>(t) * (M + 1) + r] = ur;
      }
    }
    __syncthreads();
    // column step: v_c = -log N - logsumexp over on rows of (Z_rc + u_r)
    column_reduce<LseAcc<T>>(
        M + 1, N, G, part,
        [&](int r, int c) -> T {
          if (!on[r]) return neg_inf<T>();
          return (r < M ? zrow(r)[c] : bin) + u[r];
        },
        [&](int c, const LseAcc<T>& a) {
          const T vc = -log_n - a.value();
          v[c] = vc;
          vh[static_cast<int64_t>(t) * N + c] = vc;
        });
    __syncthreads();
  }

  T* out = log_p + static_cast<int64_t>(b) * (M + 1) * N;
  for (int64_t i = tid; i < static_cast<int64_t>(M + 1) * N; i += blockDim.x) {
    const int r = static_cast<int>(i / N), c = static_cast<int>(i - static_cast<int64_t>(r) * N);
    out[i] = (r < M ? zrow(r)[c] : bin) + u[r] + v[c] + log_n;
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    sinkhorn_backward_kernel(const T* __restrict__ grad, const T* __restrict__ scores, const T* __restrict__ bin_score,
                             const bool* __restrict__ valid, const T* __restrict__ u_hist,
                             const T* __restrict__ v_hist, int M, int N, int iters, int rows_smem, int G,
                             T* __restrict__ grad_scores, T* __restrict__ grad_bin_score) {
  // shared layout: Z rows [rows_smem * N] | dZ rows [rows_smem * N] | v_t [N] | v_{t-1} [N] | dv [N]
  //                | u_t [M+1] | du [M+1] | lse [M+1] | log_mu [M+1] | part [G*N] | on [M+1]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sz = reinterpret_cast<T*>(smem_raw);
  T* sdz = sz + static_cast<int64_t>(rows_smem) * N;
  T* v = sdz + static_cast<int64_t>(rows_smem) * N;
  T* vp = v + N;
  T* dv = vp + N;
  T* u = dv + N;
  T* du = u + (M + 1);
  T* lse = du + (M + 1);
  T* log_mu = lse + (M + 1);
  SumAcc<T>* part = reinterpret_cast<SumAcc<T>*>(log_mu + (M + 1));
  bool* on = reinterpret_cast<bool*>(part + (G > 1 ? G * N : 0));

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  const T* z = scores + static_cast<int64_t>(b) * M * N;
  const T* g = grad + static_cast<int64_t>(b) * (M + 1) * N;
  T* dz = grad_scores + static_cast<int64_t>(b) * M * N;
  const T bin = bin_score[b];
  const T log_n = ef_log(T(N));
  const T* uh = u_hist + static_cast<int64_t>(b) * iters * (M + 1);
  const T* vh = v_hist + static_cast<int64_t>(b) * iters * N;

  for (int64_t i = tid; i < static_cast<int64_t>(rows_smem) * N; i += blockDim.x) sz[i] = z[i];
  setup_rows<T>(valid + static_cast<int64_t>(b) * M, M, N, on, log_mu);
  __syncthreads();

  auto zrow = [&](int r) -> const T* {
    return r < rows_smem ? sz + static_cast<int64_t>(r) * N : z + static_cast<int64_t>(r) * N;
  };
  // dZ rows live in shared memory beside their Z row, the others in the output
  auto dzrow = [&](int r) -> T* {
    return r < rows_smem ? sdz + static_cast<int64_t>(r) * N : dz + static_cast<int64_t>(r) * N;
  };

  // log_p = Z + u + v + log N: dZ starts at grad, du_T is the row sum on the
  // on rows (an invalid row's u is fixed at 0), dv_T the column sum over all
  // rows. grad_bin (the sum of the dustbin row of dZ) is kept in a register
  // of the warp that owns row M.
  T gbin = T(0);
  for (int r = warp; r <= M; r += nwarps) {
    const T* gr = g + static_cast<int64_t>(r) * N;
    T s = T(0);
    if (r < M) {
      T* dzr = dzrow(r);
      for (int c = lane; c < N; c += kWarp) {
        const T x = gr[c];
        dzr[c] = x;
        s += x;
      }
    } else {
      for (int c = lane; c < N; c += kWarp) s += gr[c];
    }
    SumAcc<T> row_sum;
    row_sum.s = s;
    s = warp_merge(row_sum).s;
    if (r == M) gbin = s;
    if (lane == 0) du[r] = on[r] ? s : T(0);
  }
  column_reduce<SumAcc<T>>(
      M + 1, N, G, part, [&](int r, int c) -> T { return g[static_cast<int64_t>(r) * N + c]; },
      [&](int c, const SumAcc<T>& a) { dv[c] = a.s; });
  __syncthreads();

  for (int t = iters; t >= 1; --t) {
    for (int r = tid; r <= M; r += blockDim.x) {
      u[r] = uh[static_cast<int64_t>(t - 1) * (M + 1) + r];
      if (t != iters) du[r] = T(0);  // u_{t} only feeds v_{t}: no upstream gradient of its own
    }
    for (int c = tid; c < N; c += blockDim.x) {
      v[c] = vh[static_cast<int64_t>(t - 1) * N + c];
      vp[c] = t >= 2 ? vh[static_cast<int64_t>(t - 2) * N + c] : T(0);
    }
    __syncthreads();

    // Phase A, one warp per on row: the column step's share,
    //   dZ -= dv_t * Pc, du_t -= sum_c dv_t * Pc, Pc = exp(Z + u_t + v_t + log N),
    // then the row softmax normaliser of this row.
    for (int r = warp; r <= M; r += nwarps) {
      if (!on[r]) continue;  // uniform over the warp
      const T a = u[r] + log_n;
      SumAcc<T> acc;
      if (r < M) {
        const T* zr = zrow(r);
        T* dzr = dzrow(r);
        for (int c = lane; c < N; c += kWarp) {
          const T gc = dv[c] * ef_exp(zr[c] + a + v[c]);
          dzr[c] -= gc;
          acc.push(gc);
        }
      } else {
        for (int c = lane; c < N; c += kWarp) acc.push(dv[c] * ef_exp(bin + a + v[c]));
      }
      const T col_share = warp_merge(acc).s;
      const T dur = du[r] - col_share;
      T lse_r;
      if (log_mu[r] == neg_inf<T>()) {  // only a dustbin with no mass: u_t = -inf says nothing
        LseAcc<T> l;
        if (r < M) {
          const T* zr = zrow(r);
          for (int c = lane; c < N; c += kWarp) l.push(zr[c] + vp[c]);
        } else {
          for (int c = lane; c < N; c += kWarp) l.push(bin + vp[c]);
        }
        lse_r = warp_merge(l).value();
      } else {
        lse_r = log_mu[r] - u[r];
      }
      if (r == M) {
        // the dustbin row of dZ only matters through its sum:
        // grad_bin -= col_share + du_t[M] * sum_c Pr[M, c]
        SumAcc<T> ps;
        for (int c = lane; c < N; c += kWarp) ps.push(ef_exp(bin + vp[c] - lse_r));
        gbin -= col_share + dur * warp_merge(ps).s;
      }
      __syncwarp();  // every lane has read du[r] before lane 0 overwrites it
      if (lane == 0) {
        du[r] = dur;
        lse[r] = lse_r;
      }
    }
    __syncthreads();

    // Phase B, per column: the row step's share,
    //   dZ -= du_t * Pr, dv_{t-1} = -sum_r du_t * Pr, Pr = exp(Z + v_{t-1} - lse).
    // dv_t is no longer needed, so dv_{t-1} overwrites it.
    column_reduce<SumAcc<T>>(
        M + 1, N, G, part,
        [&](int r, int c) -> T {
          if (!on[r]) return T(0);
          if (r == M) return du[M] * ef_exp(bin + vp[c] - lse[M]);
          T* dzr = dzrow(r);
          const T gc = du[r] * ef_exp(zrow(r)[c] + vp[c] - lse[r]);
          dzr[c] -= gc;  // (r, c) belongs to this thread alone in this phase
          return gc;
        },
        [&](int c, const SumAcc<T>& a) { dv[c] = -a.s; });
    __syncthreads();
  }

  for (int64_t i = tid; i < static_cast<int64_t>(rows_smem) * N; i += blockDim.x) dz[i] = sdz[i];
  if (warp == M % nwarps && lane == 0) grad_bin_score[b] = gbin;
}

// Threads per block: enough for the larger of the two steps to keep every
// thread busy on a batch of ~64 problems (fewer blocks than SMs), capped at
// 1024. Small problems get small blocks so that several share an SM.
int pick_threads(int64_t M, int64_t N) {
  const int64_t work = (M + 1) * N / 8;
  int threads = 128;
  while (threads < kMaxThreads && threads < work) threads *= 2;
  return threads;
}

int max_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

struct LaunchPlan {
  int threads, G, rows_smem;
  size_t smem;
};

// fixed_bytes: the shared memory that does not depend on rows_smem;
// row_bytes: what one score row kept in shared memory costs.
LaunchPlan plan_launch(const char* op, int64_t M, int64_t N, size_t fixed_bytes_no_part, size_t part_elem,
                       size_t row_bytes) {
  LaunchPlan p;
  p.threads = pick_threads(M, N);
  p.G = N < p.threads ? static_cast<int>(p.threads / N) : 1;
  const size_t fixed = fixed_bytes_no_part + (p.G > 1 ? part_elem * p.G * N : 0);
  const size_t limit = static_cast<size_t>(max_shared_bytes());
  TORCH_CHECK(fixed <= limit, op, " (CUDA): M = ", M, ", N = ", N, " needs ", fixed,
              " bytes of shared memory for its potentials, more than the device's ", limit,
              " per block; use the cpu or reference backend");
  p.rows_smem = static_cast<int>(std::min<int64_t>(M, static_cast<int64_t>((limit - fixed) / row_bytes)));
  p.smem = fixed + row_bytes * p.rows_smem;
  return p;
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// On the device of scores, and small enough for the kernels' int indexing.
void check_cuda(const char* op, const at::Tensor& scores, std::initializer_list<const at::Tensor*> tensors) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == scores.device(), op,
                " (CUDA kernel): all tensors must be on the device of scores, ", scores.device());
  }
  TORCH_CHECK(scores.dim() != 3 || (scores.size(0) <= std::numeric_limits<int>::max() && scores.size(1) < (1 << 20) &&
                                    scores.size(2) < (1 << 20)),
              op, ": sizes too large for the CUDA kernel, got ", scores.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_cuda(const at::Tensor& scores, const at::Tensor& bin_score,
                                                                 const at::Tensor& valid, int64_t iters) {
  check_cuda("sinkhorn_log", scores, {&scores, &bin_score, &valid});
  TORCH_CHECK(iters <= std::numeric_limits<int>::max(), "sinkhorn_log: iters too large, got ", iters);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto f = sinkhorn::Forward::make(scores, bin_score, valid, iters);
  if (f.B == 0) return {f.log_p, f.u_hist, f.v_hist};
  const int64_t M = f.M, N = f.N;
  ESCAPE_FAST_DISPATCH_FLOATING(f.scores.scalar_type(), "sinkhorn_log_cuda", [&] {
    using T = scalar_t;
    const size_t fixed = sizeof(T) * (N + 2 * (M + 1)) + sizeof(bool) * (M + 1);
    const auto plan = plan_launch("sinkhorn_log", M, N, fixed, sizeof(LseAcc<T>), sizeof(T) * N);
    auto kernel = sinkhorn_forward_kernel<T>;
    allow_shared(kernel, plan.smem);
    kernel<<<static_cast<unsigned>(f.B), plan.threads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(
        f.scores.data_ptr<T>(), f.bin_score.data_ptr<T>(), f.valid.data_ptr<bool>(), static_cast<int>(M),
        static_cast<int>(N), static_cast<int>(iters), plan.rows_smem, plan.G, f.log_p.data_ptr<T>(),
        f.u_hist.data_ptr<T>(), f.v_hist.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f.log_p, f.u_hist, f.v_hist};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_backward_cuda(const at::Tensor& grad, const at::Tensor& scores,
                                                              const at::Tensor& bin_score, const at::Tensor& valid,
                                                              const at::Tensor& u_hist, const at::Tensor& v_hist) {
  check_cuda("sinkhorn_log_backward", scores, {&grad, &scores, &bin_score, &valid, &u_hist, &v_hist});
  const c10::cuda::CUDAGuard guard(scores.device());
  auto b = sinkhorn::Backward::make(grad, scores, bin_score, valid, u_hist, v_hist);
  if (b.B == 0) return {b.grad_scores, b.grad_bin_score};
  const int64_t M = b.M, N = b.N;
  ESCAPE_FAST_DISPATCH_FLOATING(b.scores.scalar_type(), "sinkhorn_log_backward_cuda", [&] {
    using T = scalar_t;
    const size_t fixed = sizeof(T) * (3 * N + 4 * (M + 1)) + sizeof(bool) * (M + 1);
    const auto plan = plan_launch("sinkhorn_log_backward", M, N, fixed, sizeof(SumAcc<T>), 2 * sizeof(T) * N);
    auto kernel = sinkhorn_backward_kernel<T>;
    allow_shared(kernel, plan.smem);
    kernel<<<static_cast<unsigned>(b.B), plan.threads, plan.smem, at::cuda::getCurrentCUDAStream()>>>(
        b.grad.data_ptr<T>(), b.scores.data_ptr<T>(), b.bin_score.data_ptr<T>(), b.valid.data_ptr<bool>(),
        b.u_hist.data_ptr<T>(), b.v_hist.data_ptr<T>(), static_cast<int>(M), static_cast<int>(N),
        static_cast<int>(b.iters), plan.rows_smem, plan.G, b.grad_scores.data_ptr<T>(), b.grad_bin_score.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {b.grad_scores, b.grad_bin_score};
}

// This file's ops on the CUDA dispatch key (the schema is csrc/ops.cpp's); an op without
// a CUDA kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CUDA, m) {
  m.impl("sinkhorn_log", &sinkhorn_log_cuda);
  m.impl("sinkhorn_log_backward", &sinkhorn_log_backward_cuda);
}

}  // namespace escape_fast
