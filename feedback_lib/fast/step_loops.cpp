// The step loops of feedback_lib/fast/steps.py in C++, for the CPU (chapter
// 7, "The step loops in C++").
//
// `forward_steps` is `run_steps` and `backward_steps` is
// `run_steps_backward`: the same buffers, the same equations in the same
// order, and ATen's kernels for the matrix products (MKL-packed where
// Python packs them). What changes is who issues the per-step work: a
// Python loop costs several microseconds per tensor operation, about half
// of a forward pass at the benchmark's size. The small operations are
// written out as loops: the LayerNorms, the ReLU, the residual additions
// and the attention of one query over the memory, forward and backward.
// Their sums run in another order than ATen's (and the compiler may reorder
// them), so the two loops agree to rounding, not bit for bit; the tests
// check them against each other and against the readable loop.
//
// Layouts (all contiguous): keys/values [capacity, batch, heads, d_k];
// per-step activations [layer, step, batch, ...]; the attention weights of
// step t in rows offsets[t].. of attn [layer, sum of memory lengths, batch,
// heads]; position tables U^K [heads, d_k, M] and S [heads, 1, M],
// right-aligned (the last column is distance 1).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using at::Tensor;

// x @ weight.T + bias, with MKL's packed weight when `packed` is not empty
// (see fast/tensors.py, Linear).
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& packed,
              const Tensor& bias) {
  if (packed.numel() > 0) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkl::_mkl_linear", "")
            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                          const std::optional<Tensor>&, int64_t)>();
    std::optional<Tensor> b;
    if (bias.numel() > 0) b = bias;
    return op.call(x, packed, weight, b, x.size(0));
  }
  if (bias.numel() > 0) return at::addmm(bias, x, weight.t());
  return at::mm(x, weight.t());
}

// Sizes shared by both kernels.
struct Shape {
  int64_t batch, heads, d_k, m, longest;
  int64_t row() const {
    return batch * heads * d_k;
  }  // one memory row
  int64_t grain() const {
    return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, m * d_k));
  }
};

// The two kernels below split the (batch, head) pairs between threads, and
// each thread walks the memory rows in order (j outer, its pairs inner): a
// row's slice for a range of pairs is contiguous, so the keys and values
// stream through the cache instead of being read 256 bytes per 16 KB
// stride.

// One layer's attention at one step, for every (batch, head) pair:
//   qs = U^Q/sqrt(d_k) + Q/sqrt(d_k),
//   s_j = qs . K_j + (S_j + Q . U^K_j)/sqrt(d_k),   p = softmax_j(s),   out
//   = sum_j p_j V_j.
template <typename T>
void attention_forward(const Shape& s, const T* keys, const T* values,
                       const T* q, const T* u_q, const T* u_k, const T* s_k,
                       T scale, T* qs, T* attn, T* out) {
  const int64_t m = s.m, d_k = s.d_k, H = s.heads, BH = s.batch * s.heads,
                R = s.row();
  at::parallel_for(0, BH, s.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> score((end - begin) * m);  // [pair, j]
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % H;
      const T* q_bh = q + bh * d_k;
      T* qs_bh = qs + bh * d_k;
      for (int64_t d = 0; d < d_k; ++d)
        qs_bh[d] = u_q[h * d_k + d] + scale * q_bh[d];
      // S_j + Q . U^K_j from the table's last m columns (distances m .. 1),
      // scaled.
      T* sc = score.data() + (bh - begin) * m;
      const T* uk = u_k + h * d_k * s.longest + (s.longest - m);
      const T* sk = s_k + h * s.longest + (s.longest - m);
      for (int64_t j = 0; j < m; ++j) sc[j] = sk[j];
      for (int64_t d = 0; d < d_k; ++d) {
        const T qd = q_bh[d];
        const T* row = uk + d * s.longest;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) sc[j] += qd * row[j];
      }
      for (int64_t j = 0; j < m; ++j) sc[j] *= scale;
    }
    for (int64_t j = 0; j < m; ++j) {  // + qs . K_j
      const T* k_row = keys + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* k = k_row + bh * d_k;
        const T* qs_bh = qs + bh * d_k;
        T dot = 0;
        for (int64_t d = 0; d < d_k; ++d) dot += k[d] * qs_bh[d];
        score[(bh - begin) * m + j] += dot;
      }
    }
    for (int64_t bh = begin; bh < end; ++bh) {  // softmax over j
      T* sc = score.data() + (bh - begin) * m;
      T top = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < m; ++j) top = std::max(top, sc[j]);
      T total = 0;
      for (int64_t j = 0; j < m; ++j) {
        sc[j] = std::exp(sc[j] - top);
        total += sc[j];
      }
      for (int64_t j = 0; j < m; ++j) {
        sc[j] /= total;
        attn[j * BH + bh] = sc[j];
      }
    }
    std::fill(out + begin * d_k, out + end * d_k, T(0));
    for (int64_t j = 0; j < m; ++j) {  // out = sum_j p_j V_j
      const T* v_row = values + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T p = score[(bh - begin) * m + j];
        const T* v = v_row + bh * d_k;
        T* o = out + bh * d_k;
#pragma omp simd
        for (int64_t d = 0; d < d_k; ++d) o[d] += p * v[d];
      }
    }
  });
}

// Its backward pass, given g_att = dL/d out [batch, heads, d_k]:
//   g_p_j = V_j . g_att,  g_V_j += p_j g_att,  g_s_j = p_j (g_p_j - sum_i
//   p_i g_p_i), g_qu = sum_j g_s_j K_j,  g_K_j += g_s_j qs,  g_Q = (g_qu +
//   sum_j g_s_j U^K_j) / sqrt(d_k),
// with U^K given transposed, [heads, M, d_k] (a sum of rows instead of
// m-long dot products), and g_s stored right-aligned in g_scores [heads,
// steps, batch, M] for the tables' gradients.
template <typename T>
void attention_backward(const Shape& s, const T* keys, const T* values,
                        const T* qs, const T* attn, const T* u_k_t,
                        const T* g_att, T scale, T* g_keys, T* g_values,
                        T* g_scores, int64_t g_scores_head_stride, T* g_qu,
                        T* g_q) {
  const int64_t m = s.m, d_k = s.d_k, H = s.heads, BH = s.batch * s.heads,
                R = s.row();
  at::parallel_for(0, BH, s.grain(), [&](int64_t begin, int64_t end) {
    const int64_t pairs = end - begin;
    std::vector<T> gs(pairs * m), weighted(pairs, T(0)),
        g_pos(pairs * d_k, T(0));      // [pair, j], [pair], [pair, d]
    for (int64_t j = 0; j < m; ++j) {  // g_p_j and g_V_j
      const T* v_row = values + j * R;
      T* gv_row = g_values + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T p = attn[j * BH + bh];
        const T* v = v_row + bh * d_k;
        const T* ga = g_att + bh * d_k;
        T* gv = gv_row + bh * d_k;
        T dot = 0;
        for (int64_t d = 0; d < d_k; ++d) dot += v[d] * ga[d];
#pragma omp simd
        for (int64_t d = 0; d < d_k; ++d) gv[d] += p * ga[d];
        gs[(bh - begin) * m + j] = dot;
        weighted[bh - begin] += p * dot;
      }
    }
    for (int64_t bh = begin; bh < end; ++bh) {  // softmax backward
      const int64_t b = bh / H, h = bh % H;
      T* g = gs.data() + (bh - begin) * m;
      T* g_out = g_scores + h * g_scores_head_stride + b * s.longest +
                 (s.longest - m);
      for (int64_t j = 0; j < m; ++j) {
        g[j] = attn[j * BH + bh] * (g[j] - weighted[bh - begin]);
        g_out[j] = g[j];
      }
    }
    std::fill(g_qu + begin * d_k, g_qu + end * d_k, T(0));
    for (int64_t j = 0; j < m;
         ++j) {  // g_qu, g_K_j and the U^K part of g_Q
      const T* k_row = keys + j * R;
      T* gk_row = g_keys + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T g = gs[(bh - begin) * m + j];
        const T* k = k_row + bh * d_k;
        const T* qs_bh = qs + bh * d_k;
        const T* uk =
            u_k_t + ((bh % H) * s.longest + (s.longest - m) + j) * d_k;
        T* gk = gk_row + bh * d_k;
        T* gqu = g_qu + bh * d_k;
        T* gp = g_pos.data() + (bh - begin) * d_k;
#pragma omp simd
        for (int64_t d = 0; d < d_k; ++d) {
          gqu[d] += g * k[d];
          gk[d] += g * qs_bh[d];
          gp[d] += g * uk[d];
        }
      }
    }
    for (int64_t bh = begin; bh < end; ++bh) {
      const T* gqu = g_qu + bh * d_k;
      const T* gp = g_pos.data() + (bh - begin) * d_k;
      T* gq = g_q + bh * d_k;
#pragma omp simd
      for (int64_t d = 0; d < d_k; ++d) gq[d] = (gqu[d] + gp[d]) * scale;
    }
  });
}

// Row-wise helpers for [rows, width] blocks: a LayerNorm that writes its
// statistics where the backward pass keeps them, its backward pass with the
// residual gradient added, and the small elementwise steps. Each replaces
// one to three ATen calls per layer and step.

template <typename T>
void layer_norm(const T* x, const T* gamma, const T* beta, double eps,
                int64_t rows, int64_t width, T* z, T* mean, T* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    T sum = 0;
    for (int64_t d = 0; d < width; ++d) sum += xr[d];
    const T mu = sum / width;
    T sq = 0;
    for (int64_t d = 0; d < width; ++d) sq += (xr[d] - mu) * (xr[d] - mu);
    const T rs = T(1) / std::sqrt(sq / width + static_cast<T>(eps));
    T* zr = z + r * width;
#pragma omp simd
    for (int64_t d = 0; d < width; ++d)
      zr[d] = (xr[d] - mu) * rs * gamma[d] + beta[d];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// g_x = rstd * (g_xhat - mean(g_xhat) - xhat * mean(g_xhat * xhat)) +
// residual, with g_xhat = g_z * gamma; `residual2`, if not null, is added
// scaled by `scale2` (the memory's share of the gradient).
template <typename T>
void layer_norm_backward(const T* g_z, const T* x, const T* mean,
                         const T* rstd, const T* gamma, int64_t rows,
                         int64_t width, const T* residual,
                         const T* residual2, T scale2, T* g_x) {
  for (int64_t r = 0; r < rows; ++r) {
    const T *gz = g_z + r * width, *xr = x + r * width;
    const T mu = mean[r], rs = rstd[r];
    T sum_g = 0, sum_gx = 0;
    for (int64_t d = 0; d < width; ++d) {
      const T g = gz[d] * gamma[d];
      sum_g += g;
      sum_gx += g * (xr[d] - mu) * rs;
    }
    sum_g /= width;
    sum_gx /= width;
    const T* res = residual + r * width;
    T* out = g_x + r * width;
#pragma omp simd
    for (int64_t d = 0; d < width; ++d)
      out[d] =
          rs * (gz[d] * gamma[d] - sum_g - (xr[d] - mu) * rs * sum_gx) +
          res[d];
    if (residual2 != nullptr) {
      const T* res2 = residual2 + r * width;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) out[d] += scale2 * res2[d];
    }
  }
}

template <typename T>
void add(const T* a, const T* b, int64_t n, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// The argument lists, in the field order of the dataclasses of
// fast/tensors.py (their native_layout): feedback_lib.fast.native checks
// these names against them when the extension loads.

// clang-format off
// Per layer, the forward tensors (Layer).
enum Fwd { G1, B1, WQ, WQ_P, WQ_B, UQ, UK, SK, WO, WO_P, BO, G2, B2,
           W1, W1_P, C1, W2, W2_P, C2, N_FWD };
const char* const kFwd[] = {
    "norm1_weight", "norm1_bias", "query.weight", "query.packed",
    "query.bias", "u_q", "u_k", "s", "output.weight", "output.packed",
    "output.bias", "norm2_weight", "norm2_bias", "ff1.weight",
    "ff1.packed", "ff1.bias", "ff2.weight", "ff2.packed", "ff2.bias"};
// Per layer, the backward tensors (TransposedLayer).
enum Bwd { BG1, BB1, WQT, WQT_P, WQT_B, UKT, WOT, WOT_P, WOT_B, BG2, BB2,
           W1T, W1T_P, W1T_B, W2T, W2T_P, W2T_B, N_BWD };
const char* const kBwd[] = {
    "norm1_weight", "norm1_bias", "query_t.weight", "query_t.packed",
    "query_t.bias", "u_k_t", "output_t.weight", "output_t.packed",
    "output_t.bias", "norm2_weight", "norm2_bias", "ff1_t.weight",
    "ff1_t.packed", "ff1_t.bias", "ff2_t.weight", "ff2_t.packed",
    "ff2_t.bias"};
// The memory vector's key and value projections, transposed in the
// backward pass (MemoryProjection).
enum Proj { WK, WK_P, WK_B, WV, WV_P, WV_B, N_PROJ };
const char* const kProj[] = {"key.weight", "key.packed", "key.bias",
                             "value.weight", "value.packed", "value.bias"};
// The activations (Activations).
enum Act { XS, MEMS, ATT_OUTS, MIDS, HIDDENS, MEAN1, RSTD1, MEAN2, RSTD2,
           QUERIES, SCALED, ATTN, N_ACT };
const char* const kAct[] = {"xs", "mems", "att_outs", "mids", "hiddens",
                            "mean1", "rstd1", "mean2", "rstd2", "queries",
                            "scaled", "attn"};
// The backward buffers (Gradients).
enum Grad { G_KEYS, G_VALUES, G_X_SEQ, G_MEMS, G_WEIGHTS, G_OUTS, G_HIDDENS,
            G_Z2S, G_MIDS, G_QS, G_Z1S, G_QUS, G_SCORES, N_GRAD };
const char* const kGrad[] = {"keys", "values", "x_seq", "mems", "weights",
                             "outs", "hiddens", "z2s", "mids", "qs", "z1s",
                             "qus", "scores"};
// clang-format on

template <size_t N>
constexpr size_t count(const char* const (&)[N]) {
  return N;
}
static_assert(count(kFwd) == N_FWD && count(kBwd) == N_BWD &&
                  count(kProj) == N_PROJ && count(kAct) == N_ACT &&
                  count(kGrad) == N_GRAD,
              "one name per entry of each argument list");

std::vector<std::string> names(const char* const* list, int n) {
  return {list, list + n};
}

std::map<std::string, std::vector<std::string>> layouts() {
  return {{"Layer", names(kFwd, N_FWD)},
          {"TransposedLayer", names(kBwd, N_BWD)},
          {"MemoryProjection", names(kProj, N_PROJ)},
          {"Activations", names(kAct, N_ACT)},
          {"Gradients", names(kGrad, N_GRAD)}};
}

// The number of floats in MKL's packed copy of an [out, in] weight (what
// Linear packs), once per shape.
int64_t packed_numel(int64_t out, int64_t in, int64_t rows) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 3>, int64_t> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const std::array<int64_t, 3> key{out, in, rows};
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  static auto reorder =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkl::_mkl_reorder_linear_weight", "")
          .typed<Tensor(const Tensor&, int64_t)>();
  const int64_t n =
      reorder.call(at::zeros({out, in}, at::kFloat), rows).numel();
  known.emplace(key, n);
  return n;
}

// The sizes the loops index their buffers with. `check` holds every tensor
// to exactly the shape the loops assume, so that no step reads or writes
// outside a buffer, whatever the loops are given.
struct Sizes {
  int64_t n_layers, seq_len, batch, heads, d_k, d_model, width, d_ff,
      capacity, longest, attn_rows;
};

struct Checker {
  const char* what;
  at::ScalarType dtype;
  int64_t rows;  // of the per-step matrix products: the batch

  void shape(const Tensor& t, at::IntArrayRef expected,
             const std::string& name) const {
    TORCH_CHECK(t.defined(), what, ": ", name, " is missing");
    TORCH_CHECK(t.device().is_cpu(), what, ": ", name,
                " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, what, ": ", name, " has dtype ",
                t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), what, ": ", name, " must be contiguous");
    TORCH_CHECK(t.sizes() == expected, what, ": ", name, " has shape ",
                t.sizes(), ", expected ", expected);
  }
  // A Linear's weight [out, in], its packed copy or an empty tensor, and
  // its bias [out] or an empty tensor.
  void linear(const Tensor* args, const char* const* list, int weight,
              int64_t out, int64_t in) const {
    shape(args[weight], {out, in}, list[weight]);
    const Tensor& packed = args[weight + 1];
    TORCH_CHECK(packed.defined() && packed.device().is_cpu(), what, ": ",
                list[weight + 1], " is missing");
    if (packed.numel() > 0) {
      TORCH_CHECK(
          dtype == at::kFloat && packed.scalar_type() == at::kFloat &&
              packed.is_contiguous() &&
              packed.numel() == packed_numel(out, in, rows),
          what, ": ", list[weight + 1], " is not MKL's packed copy of a [",
          out, ", ", in, "] weight");
    }
    const Tensor& bias = args[weight + 2];
    TORCH_CHECK(bias.defined(), what, ": ", list[weight + 2],
                " is missing");
    if (bias.numel() > 0) shape(bias, {out}, list[weight + 2]);
  }
};

// The sizes, read off keys [capacity, batch, heads, d_k], the inputs'
// buffer xs [seq_len, n_layers + 1, batch, d_model], the hidden layer, a
// position table and the attention weights; then the shapes of the memory
// and of the activations, which both loops share.
Sizes shared_sizes(const Checker& c, const std::vector<Tensor>& acts,
                   const Tensor& keys, const Tensor& values,
                   const Tensor& weights, int64_t n_layers,
                   const Tensor& table, int64_t table_axis) {
  TORCH_CHECK(acts.size() == N_ACT, c.what, ": ", N_ACT,
              " activation buffers expected, got ", acts.size());
  TORCH_CHECK(n_layers >= 1, c.what, ": at least one layer expected");
  TORCH_CHECK(keys.defined() && keys.dim() == 4 && acts[XS].defined() &&
                  acts[XS].dim() == 4 && acts[HIDDENS].defined() &&
                  acts[HIDDENS].dim() == 4 && acts[ATTN].defined() &&
                  acts[ATTN].dim() == 4 && table.defined() &&
                  table.dim() == 3,
              c.what,
              ": keys, xs, hiddens and attn must be 4-D and the position "
              "tables 3-D");
  Sizes s{};
  s.n_layers = n_layers, s.capacity = keys.size(0), s.batch = keys.size(1),
  s.heads = keys.size(2);
  s.d_k = keys.size(3), s.d_model = s.heads * s.d_k,
  s.width = s.batch * s.d_model;
  s.seq_len = acts[XS].size(0), s.d_ff = acts[HIDDENS].size(-1);
  s.longest = table.size(table_axis), s.attn_rows = acts[ATTN].size(1);
  c.shape(keys, {s.capacity, s.batch, s.heads, s.d_k}, "keys");
  c.shape(values, {s.capacity, s.batch, s.heads, s.d_k}, "values");
  c.shape(weights, {n_layers + 1}, "weights");
  const int64_t L = n_layers, T = s.seq_len, B = s.batch, D = s.d_model;
  const std::vector<std::vector<int64_t>> expected = {
      {T, L + 1, B, D},
      {T, B, D},
      {L, T, B, D},
      {L, T, B, D},
      {L, T, B, s.d_ff},
      {L, T, B, 1},
      {L, T, B, 1},
      {L, T, B, 1},
      {L, T, B, 1},
      {L, T, B, s.heads, s.d_k},
      {L, T, B, s.heads, s.d_k},
      {L, s.attn_rows, B, s.heads}};
  for (int i = 0; i < N_ACT; ++i) c.shape(acts[i], expected[i], kAct[i]);
  return s;
}

// The step spans must stay inside the buffers: step t writes memory row
// n_prefix + t and reads rows starts[t] .. n_prefix + t - 1, position-table
// columns from the right, and attention weights at offsets[t].
void check_spans(const Checker& c, const Sizes& s,
                 const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& offsets, int64_t n_prefix) {
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == s.seq_len &&
                  static_cast<int64_t>(offsets.size()) == s.seq_len,
              c.what, ": one start and one offset per step");
  TORCH_CHECK(n_prefix >= 0 && n_prefix + s.seq_len <= s.capacity, c.what,
              ": the steps do not fit in the memory");
  for (int64_t t = 0; t < s.seq_len; ++t) {
    const int64_t n = n_prefix + t, m = n - starts[t];
    TORCH_CHECK(starts[t] >= 0 && m >= 0 && m <= s.longest, c.what,
                ": step ", t, " sees rows ", starts[t], "..", n,
                ", beyond the ", s.longest,
                " distances of the position tables");
    TORCH_CHECK(offsets[t] >= 0 && offsets[t] + m <= s.attn_rows, c.what,
                ": step ", t,
                "'s attention weights do not fit in their buffer");
  }
}

// Pointer to element [i][t] of a [layer, step, ...] buffer.
template <typename T>
T* at_step(const Tensor& buffer, int64_t i, int64_t t) {
  return buffer.data_ptr<T>() + (i * buffer.size(1) + t) * buffer.stride(1);
}

template <typename T>
void forward_steps_impl(const Sizes& sz, const std::vector<Tensor>& layers,
                        const std::vector<double>& eps,
                        const std::vector<Tensor>& proj,
                        const Tensor& weights,
                        const std::vector<Tensor>& acts, const Tensor& keys,
                        const Tensor& values,
                        const std::vector<int64_t>& starts,
                        const std::vector<int64_t>& offsets,
                        int64_t n_prefix) {
  [[maybe_unused]] const auto [n_layers, seq_len, batch, heads, d_k,
                               d_model, width, d_ff, capacity, longest,
                               attn_rows] = sz;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d_k)));
  const T* w = weights.data_ptr<T>();
  Tensor z = at::empty({batch, d_model},
                       keys.options());  // a LayerNorm's output, reused
  T* xs = acts[XS].data_ptr<T>();
  for (int64_t t = 0; t < seq_len; ++t) {
    const int64_t n = n_prefix + t, start = starts[t], m = n - start;
    T* xs_t =
        xs + t * (n_layers + 1) * width;  // [n_layers + 1, batch, d_model]
    for (int64_t i = 0; i < n_layers; ++i) {
      const Tensor* L = layers.data() + i * N_FWD;
      const T* x = xs_t + i * width;
      T* x_mid = at_step<T>(acts[MIDS], i, t);
      if (m > 0) {
        layer_norm<T>(x, L[G1].data_ptr<T>(), L[B1].data_ptr<T>(),
                      eps[2 * i], batch, d_model, z.data_ptr<T>(),
                      at_step<T>(acts[MEAN1], i, t),
                      at_step<T>(acts[RSTD1], i, t));
        const Tensor q = linear(z, L[WQ], L[WQ_P], L[WQ_B]);
        T* q_buf = at_step<T>(acts[QUERIES], i, t);
        std::copy(q.data_ptr<T>(), q.data_ptr<T>() + width, q_buf);
        T* att_out = at_step<T>(acts[ATT_OUTS], i, t);
        const Shape s{batch, heads, d_k, m, longest};
        attention_forward<T>(
            s, keys.data_ptr<T>() + start * s.row(),
            values.data_ptr<T>() + start * s.row(), q_buf,
            L[UQ].data_ptr<T>(), L[UK].data_ptr<T>(), L[SK].data_ptr<T>(),
            scale, at_step<T>(acts[SCALED], i, t),
            at_step<T>(acts[ATTN], i, 0) + offsets[t] * batch * heads,
            att_out);
        const Tensor o = linear(acts[ATT_OUTS].select(0, i).select(0, t),
                                L[WO], L[WO_P], L[BO]);
        add<T>(o.data_ptr<T>(), x, width, x_mid);  // x + attention
      } else {
        std::copy(x, x + width,
                  x_mid);  // no memory yet: the attention block is skipped
      }
      layer_norm<T>(x_mid, L[G2].data_ptr<T>(), L[B2].data_ptr<T>(),
                    eps[2 * i + 1], batch, d_model, z.data_ptr<T>(),
                    at_step<T>(acts[MEAN2], i, t),
                    at_step<T>(acts[RSTD2], i, t));
      const Tensor h = linear(z, L[W1], L[W1_P], L[C1]);
      const T* hp = h.data_ptr<T>();
      T* hidden = at_step<T>(acts[HIDDENS], i, t);
#pragma omp simd
      for (int64_t k = 0; k < batch * d_ff; ++k)
        hidden[k] = hp[k] > 0 ? hp[k] : T(0);  // ReLU
      const Tensor f = linear(acts[HIDDENS].select(0, i).select(0, t),
                              L[W2], L[W2_P], L[C2]);
      add<T>(f.data_ptr<T>(), x_mid, width,
             xs_t + (i + 1) * width);  // x_mid + feed-forward
    }
    // The memory vector (the layer-weighted sum of x^0 .. x^L) and its key
    // and value, into row n.
    T* mem = acts[MEMS].data_ptr<T>() + t * width;
    std::fill(mem, mem + width, T(0));
    for (int64_t l = 0; l <= n_layers; ++l) {
      const T* x = xs_t + l * width;
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) mem[k] += w[l] * x[k];
    }
    const Tensor mem_t = acts[MEMS].select(0, t);
    const Tensor key = linear(mem_t, proj[WK], proj[WK_P], proj[WK_B]);
    const Tensor value = linear(mem_t, proj[WV], proj[WV_P], proj[WV_B]);
    std::copy(key.data_ptr<T>(), key.data_ptr<T>() + width,
              keys.data_ptr<T>() + n * width);
    std::copy(value.data_ptr<T>(), value.data_ptr<T>() + width,
              values.data_ptr<T>() + n * width);
  }
}

void forward_steps(const std::vector<Tensor>& layers,
                   const std::vector<double>& eps,
                   const std::vector<Tensor>& proj, const Tensor& weights,
                   const std::vector<Tensor>& acts, const Tensor& keys,
                   const Tensor& values, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& offsets, int64_t n_prefix) {
  const char* what = "forward_steps";
  TORCH_CHECK(!layers.empty() && layers.size() % N_FWD == 0, what, ": ",
              N_FWD, " tensors per layer expected");
  TORCH_CHECK(proj.size() == N_PROJ, what, ": ", N_PROJ,
              " projection tensors expected");
  TORCH_CHECK(keys.defined() && keys.dim() == 4, what,
              ": keys must be [capacity, batch, heads, d_k]");
  const int64_t n_layers = layers.size() / N_FWD;
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * n_layers, what,
              ": two LayerNorm eps per layer");
  const Checker c{what, keys.scalar_type(), keys.size(1)};
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kDouble, what,
              ": float32 or float64 tensors expected");
  const Sizes s =
      shared_sizes(c, acts, keys, values, weights, n_layers, layers[UK], 2);
  const int64_t D = s.d_model;
  for (int64_t i = 0; i < n_layers; ++i) {
    const Tensor* L = layers.data() + i * N_FWD;
    c.shape(L[G1], {D}, kFwd[G1]), c.shape(L[B1], {D}, kFwd[B1]),
        c.shape(L[G2], {D}, kFwd[G2]);
    c.shape(L[B2], {D}, kFwd[B2]),
        c.shape(L[UQ], {s.heads, s.d_k}, kFwd[UQ]);
    c.shape(L[UK], {s.heads, s.d_k, s.longest}, kFwd[UK]),
        c.shape(L[SK], {s.heads, 1, s.longest}, kFwd[SK]);
    c.linear(L, kFwd, WQ, D, D), c.linear(L, kFwd, WO, D, D);
    c.linear(L, kFwd, W1, s.d_ff, D), c.linear(L, kFwd, W2, D, s.d_ff);
  }
  c.linear(proj.data(), kProj, WK, D, D),
      c.linear(proj.data(), kProj, WV, D, D);
  check_spans(c, s, starts, offsets, n_prefix);
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "step_loops", [&] {
    forward_steps_impl<scalar_t>(s, layers, eps, proj, weights, acts, keys,
                                 values, starts, offsets, n_prefix);
  });
}

template <typename T>
void backward_steps_impl(
    const Sizes& sz, const std::vector<Tensor>& layers,
    const std::vector<Tensor>& proj, const Tensor& weights,
    const std::vector<Tensor>& acts, const Tensor& keys,
    const Tensor& values, const std::vector<Tensor>& grads,
    const Tensor& grad_out, const std::vector<int64_t>& starts,
    const std::vector<int64_t>& offsets, int64_t n_prefix) {
  [[maybe_unused]] const auto [n_layers, seq_len, batch, heads, d_k,
                               d_model, width, d_ff, capacity, longest,
                               attn_rows] = sz;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d_k)));
  const T* w = weights.data_ptr<T>();
  const T* xs = acts[XS].data_ptr<T>();
  Tensor g_mid_scratch = at::empty(
      {batch, d_model}, keys.options());  // g_mid of a step without memory
  T* g_keys = grads[G_KEYS].data_ptr<T>();
  T* g_values = grads[G_VALUES].data_ptr<T>();
  for (int64_t t = seq_len - 1; t >= 0; --t) {
    const int64_t n = n_prefix + t, start = starts[t], m = n - start;
    const T* xs_t = xs + t * (n_layers + 1) * width;
    // Row n is complete: every later step has added its share. Back through
    // key and value.
    const Tensor gk =
        linear(grads[G_KEYS].select(0, n).view({batch, d_model}), proj[WK],
               proj[WK_P], proj[WK_B]);
    const Tensor gv =
        linear(grads[G_VALUES].select(0, n).view({batch, d_model}),
               proj[WV], proj[WV_P], proj[WV_B]);
    T* g_mem = grads[G_MEMS].data_ptr<T>() + t * width;
    add<T>(gk.data_ptr<T>(), gv.data_ptr<T>(), width, g_mem);
    grads[G_WEIGHTS].addmv_(
        acts[XS].select(0, t).view({n_layers + 1, width}),
        grads[G_MEMS].select(0, t).view({-1}));
    // The memory's share of each layer's gradient is w[l] * g_mem, added
    // where the Python loop adds g_layers[l].
    T* g = at_step<T>(grads[G_OUTS], n_layers - 1, t);
    const T* go = grad_out.data_ptr<T>() + t * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k)
      g[k] = go[k] + w[n_layers] * g_mem[k];
    for (int64_t i = n_layers - 1; i >= 0; --i) {
      const Tensor* L = layers.data() + i * N_BWD;
      // x = x_mid + W_2 relu(W_1 LayerNorm(x_mid) + c_1) + c_2
      const Tensor a = linear(
          grads[G_OUTS].select(0, i).select(0, t).view({batch, d_model}),
          L[W2T], L[W2T_P], L[W2T_B]);
      const T* ap = a.data_ptr<T>();
      const T* hidden = at_step<T>(acts[HIDDENS], i, t);
      T* g_hidden = at_step<T>(grads[G_HIDDENS], i, t);
#pragma omp simd
      for (int64_t k = 0; k < batch * d_ff; ++k)
        g_hidden[k] = hidden[k] > 0 ? ap[k] : T(0);
      const Tensor b = linear(grads[G_HIDDENS].select(0, i).select(0, t),
                              L[W1T], L[W1T_P], L[W1T_B]);
      T* g_z2 = at_step<T>(grads[G_Z2S], i, t);
      std::copy(b.data_ptr<T>(), b.data_ptr<T>() + width, g_z2);
      T* g_mid = m > 0 ? at_step<T>(grads[G_MIDS], i, t)
                       : g_mid_scratch.data_ptr<T>();
      layer_norm_backward<T>(
          g_z2, at_step<T>(acts[MIDS], i, t), at_step<T>(acts[MEAN2], i, t),
          at_step<T>(acts[RSTD2], i, t), L[BG2].data_ptr<T>(), batch,
          d_model, g, nullptr, T(0), g_mid);
      T* out = i > 0 ? at_step<T>(grads[G_OUTS], i - 1, t)
                     : grads[G_X_SEQ].data_ptr<T>() + t * width;
      if (m > 0) {
        // x_mid = x + W_o att_out + b_o, att_out = sum_j attn_j V_j
        const Tensor g_att = linear(grads[G_MIDS].select(0, i).select(0, t),
                                    L[WOT], L[WOT_P], L[WOT_B]);
        T* g_q = at_step<T>(grads[G_QS], i, t);
        const Shape s{batch, heads, d_k, m, longest};
        const Tensor& g_scores =
            grads[G_SCORES];  // [layer, heads, steps, batch, M]
        attention_backward<T>(
            s, keys.data_ptr<T>() + start * s.row(),
            values.data_ptr<T>() + start * s.row(),
            at_step<T>(acts[SCALED], i, t),
            at_step<T>(acts[ATTN], i, 0) + offsets[t] * batch * heads,
            L[UKT].data_ptr<T>(), g_att.data_ptr<T>(), scale,
            g_keys + start * s.row(), g_values + start * s.row(),
            g_scores.data_ptr<T>() + i * g_scores.stride(0) +
                t * g_scores.stride(2),
            g_scores.stride(1), at_step<T>(grads[G_QUS], i, t), g_q);
        const Tensor c = linear(
            grads[G_QS].select(0, i).select(0, t).view({batch, d_model}),
            L[WQT], L[WQT_P], L[WQT_B]);
        T* g_z1 = at_step<T>(grads[G_Z1S], i, t);
        std::copy(c.data_ptr<T>(), c.data_ptr<T>() + width, g_z1);
        layer_norm_backward<T>(
            g_z1, xs_t + i * width, at_step<T>(acts[MEAN1], i, t),
            at_step<T>(acts[RSTD1], i, t), L[BG1].data_ptr<T>(), batch,
            d_model, g_mid, g_mem, w[i], out);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < width; ++k)
          out[k] = g_mid[k] + w[i] * g_mem[k];
      }
      g = out;
    }
  }
}

void backward_steps(const std::vector<Tensor>& layers,
                    const std::vector<Tensor>& proj, const Tensor& weights,
                    const std::vector<Tensor>& acts, const Tensor& keys,
                    const Tensor& values, const std::vector<Tensor>& grads,
                    const Tensor& grad_out,
                    const std::vector<int64_t>& starts,
                    const std::vector<int64_t>& offsets, int64_t n_prefix) {
  const char* what = "backward_steps";
  TORCH_CHECK(!layers.empty() && layers.size() % N_BWD == 0, what, ": ",
              N_BWD, " tensors per layer expected");
  TORCH_CHECK(proj.size() == N_PROJ, what, ": ", N_PROJ,
              " projection tensors expected");
  TORCH_CHECK(grads.size() == N_GRAD, what, ": ", N_GRAD,
              " gradient buffers expected");
  TORCH_CHECK(keys.defined() && keys.dim() == 4, what,
              ": keys must be [capacity, batch, heads, d_k]");
  const int64_t n_layers = layers.size() / N_BWD;
  const Checker c{what, keys.scalar_type(), keys.size(1)};
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kDouble, what,
              ": float32 or float64 tensors expected");
  const Sizes s = shared_sizes(c, acts, keys, values, weights, n_layers,
                               layers[UKT], 1);
  const int64_t L = n_layers, T = s.seq_len, B = s.batch, D = s.d_model;
  for (int64_t i = 0; i < n_layers; ++i) {
    const Tensor* layer = layers.data() + i * N_BWD;
    c.shape(layer[BG1], {D}, kBwd[BG1]),
        c.shape(layer[BB1], {D}, kBwd[BB1]);
    c.shape(layer[BG2], {D}, kBwd[BG2]),
        c.shape(layer[BB2], {D}, kBwd[BB2]);
    c.shape(layer[UKT], {s.heads, s.longest, s.d_k}, kBwd[UKT]);
    c.linear(layer, kBwd, WQT, D, D), c.linear(layer, kBwd, WOT, D, D);
    c.linear(layer, kBwd, W1T, D, s.d_ff),
        c.linear(layer, kBwd, W2T, s.d_ff, D);
  }
  c.linear(proj.data(), kProj, WK, D, D),
      c.linear(proj.data(), kProj, WV, D, D);
  const std::vector<std::vector<int64_t>> expected = {
      {s.capacity, B, s.heads, s.d_k},
      {s.capacity, B, s.heads, s.d_k},
      {T, B, D},
      {T, B, D},
      {L + 1},
      {L, T, B, D},
      {L, T, B, s.d_ff},
      {L, T, B, D},
      {L, T, B, D},
      {L, T, B, D},
      {L, T, B, D},
      {L, T, B, D},
      {L, s.heads, T, B, s.longest}};
  for (int i = 0; i < N_GRAD; ++i) c.shape(grads[i], expected[i], kGrad[i]);
  c.shape(grad_out, {T, B, D}, "grad_out");
  check_spans(c, s, starts, offsets, n_prefix);
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "step_loops", [&] {
    backward_steps_impl<scalar_t>(s, layers, proj, weights, acts, keys,
                                  values, grads, grad_out, starts, offsets,
                                  n_prefix);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward_steps", &forward_steps,
             "fast.steps.run_steps in C++");
  module.def("backward_steps", &backward_steps,
             "fast.steps.run_steps_backward in C++");
  module.def("layouts", &layouts,
             "the names of the argument lists, in order");
}
