// The step loops of feedback_lib/fused_kv.py in C++, for the CPU (chapter 7, "The step loops in C++").
//
// `forward_steps` is `run_steps` and `backward_steps` is `run_steps_backward`: the same buffers, the
// same equations in the same order, and ATen's kernels for the matrix products (MKL-packed where
// Python packs them). What changes is who issues the per-step work: a Python loop costs several
// microseconds per tensor operation, about half of a forward pass at the benchmark's size. The
// small operations are written out as loops: the LayerNorms, the ReLU, the residual additions and
// the attention of one query over the memory, forward and backward. Their sums run in another order
// than ATen's (and the compiler may reorder them), so the two loops agree to rounding, not bit for
// bit; the tests check them against each other and against the reference loop.
//
// Layouts (all contiguous): keys/values [capacity, batch, heads, d_k]; per-step activations
// [layer, step, batch, ...]; the attention weights of step t in rows offsets[t].. of
// attn [layer, sum of memory lengths, batch, heads]; position tables U^K [heads, d_k, M] and
// S [heads, M], right-aligned (the last column is distance 1).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

// x @ weight.T + bias, with MKL's packed weight when `packed` is not empty (see fused_kv.Linear).
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& packed, const Tensor& bias) {
  if (packed.numel() > 0) {
    static auto op = c10::Dispatcher::singleton()
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
  int64_t row() const { return batch * heads * d_k; }   // one memory row
  int64_t grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, m * d_k)); }
};

// The two kernels below split the (batch, head) pairs between threads, and each thread walks the
// memory rows in order (j outer, its pairs inner): a row's slice for a range of pairs is contiguous,
// so the keys and values stream through the cache instead of being read 256 bytes per 16 KB stride.

// One layer's attention at one step, for every (batch, head) pair:
//   qs = U^Q/sqrt(d_k) + Q/sqrt(d_k),
//   s_j = qs . K_j + (S_j + Q . U^K_j)/sqrt(d_k),   p = softmax_j(s),   out = sum_j p_j V_j.
template <typename T>
void attention_forward(const Shape& s, const T* keys, const T* values, const T* q, const T* u_q,
                       const T* u_k, const T* s_k, T scale, T* qs, T* attn, T* out) {
  const int64_t m = s.m, d_k = s.d_k, H = s.heads, BH = s.batch * s.heads, R = s.row();
  at::parallel_for(0, BH, s.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> score((end - begin) * m);   // [pair, j]
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % H;
      const T* q_bh = q + bh * d_k;
      T* qs_bh = qs + bh * d_k;
      for (int64_t d = 0; d < d_k; ++d) qs_bh[d] = u_q[h * d_k + d] + scale * q_bh[d];
      // S_j + Q . U^K_j from the table's last m columns (distances m .. 1), scaled.
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
    for (int64_t j = 0; j < m; ++j) {                   // + qs . K_j
      const T* k_row = keys + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T* k = k_row + bh * d_k;
        const T* qs_bh = qs + bh * d_k;
        T dot = 0;
        for (int64_t d = 0; d < d_k; ++d) dot += k[d] * qs_bh[d];
        score[(bh - begin) * m + j] += dot;
      }
    }
    for (int64_t bh = begin; bh < end; ++bh) {          // softmax over j
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
    for (int64_t j = 0; j < m; ++j) {                   // out = sum_j p_j V_j
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
//   g_p_j = V_j . g_att,  g_V_j += p_j g_att,  g_s_j = p_j (g_p_j - sum_i p_i g_p_i),
//   g_qu = sum_j g_s_j K_j,  g_K_j += g_s_j qs,  g_Q = (g_qu + sum_j g_s_j U^K_j) / sqrt(d_k),
// with U^K given transposed, [heads, M, d_k] (a sum of rows instead of m-long dot products),
// and g_s stored right-aligned in g_scores [heads, steps, batch, M] for the tables' gradients.
template <typename T>
void attention_backward(const Shape& s, const T* keys, const T* values, const T* qs, const T* attn,
                        const T* u_k_t, const T* g_att, T scale, T* g_keys, T* g_values, T* g_scores,
                        int64_t g_scores_head_stride, T* g_qu, T* g_q) {
  const int64_t m = s.m, d_k = s.d_k, H = s.heads, BH = s.batch * s.heads, R = s.row();
  at::parallel_for(0, BH, s.grain(), [&](int64_t begin, int64_t end) {
    const int64_t pairs = end - begin;
    std::vector<T> gs(pairs * m), weighted(pairs, T(0)), g_pos(pairs * d_k, T(0));   // [pair, j], [pair], [pair, d]
    for (int64_t j = 0; j < m; ++j) {                   // g_p_j and g_V_j
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
    for (int64_t bh = begin; bh < end; ++bh) {          // softmax backward
      const int64_t b = bh / H, h = bh % H;
      T* g = gs.data() + (bh - begin) * m;
      T* g_out = g_scores + h * g_scores_head_stride + b * s.longest + (s.longest - m);
      for (int64_t j = 0; j < m; ++j) {
        g[j] = attn[j * BH + bh] * (g[j] - weighted[bh - begin]);
        g_out[j] = g[j];
      }
    }
    std::fill(g_qu + begin * d_k, g_qu + end * d_k, T(0));
    for (int64_t j = 0; j < m; ++j) {                   // g_qu, g_K_j and the U^K part of g_Q
      const T* k_row = keys + j * R;
      T* gk_row = g_keys + j * R;
      for (int64_t bh = begin; bh < end; ++bh) {
        const T g = gs[(bh - begin) * m + j];
        const T* k = k_row + bh * d_k;
        const T* qs_bh = qs + bh * d_k;
        const T* uk = u_k_t + ((bh % H) * s.longest + (s.longest - m) + j) * d_k;
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

// Row-wise helpers for [rows, width] blocks: a LayerNorm that writes its statistics where the
// backward pass keeps them, its backward pass with the residual gradient added, and the small
// elementwise steps. Each replaces one to three ATen calls per layer and step.

template <typename T>
void layer_norm(const T* x, const T* gamma, const T* beta, double eps, int64_t rows, int64_t width, T* z, T* mean,
                T* rstd) {
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
    for (int64_t d = 0; d < width; ++d) zr[d] = (xr[d] - mu) * rs * gamma[d] + beta[d];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// g_x = rstd * (g_xhat - mean(g_xhat) - xhat * mean(g_xhat * xhat)) + residual, with g_xhat = g_z * gamma;
// `residual2`, if not null, is added scaled by `scale2` (the memory's share of the gradient).
template <typename T>
void layer_norm_backward(const T* g_z, const T* x, const T* mean, const T* rstd, const T* gamma, int64_t rows,
                         int64_t width, const T* residual, const T* residual2, T scale2, T* g_x) {
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
      out[d] = rs * (gz[d] * gamma[d] - sum_g - (xr[d] - mu) * rs * sum_gx) + res[d];
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

void check_contiguous(const std::vector<Tensor>& tensors, const char* what) {
  for (const auto& t : tensors) TORCH_CHECK(!t.defined() || t.is_contiguous(), what, ": every tensor must be contiguous");
}

// Per layer, the forward tensors (18), as fused_kv.Layer.native lists them.
enum Fwd { G1, B1, WQ, WQ_P, UQ, UK, SK, WO, WO_P, BO, G2, B2, W1, W1_P, C1, W2, W2_P, C2, N_FWD };
// Per layer, the backward tensors (13), as fused_kv.TransposedLayer.native lists them.
enum Bwd { BG1, BB1, WQT, WQT_P, BUKT, WOT, WOT_P, BG2, BB2, W1T, W1T_P, W2T, W2T_P, N_BWD };
// The activations, as fused_kv.Activations.native lists them.
enum Act { XS, MEMS, ATT_OUTS, MIDS, HIDDENS, MEAN1, RSTD1, MEAN2, RSTD2, QUERIES, SCALED, ATTN, N_ACT };
// The backward buffers, as fused_kv.Gradients.native lists them.
enum Grad { G_KEYS, G_VALUES, G_X_SEQ, G_MEMS, G_WEIGHTS, G_OUTS, G_HIDDENS, G_Z2S, G_MIDS, G_QS, G_Z1S, G_QUS,
            G_SCORES, N_GRAD };

// The sizes both step loops read off their buffers.
struct Sizes {
  int64_t n_layers, seq_len, batch, heads, d_k, d_model, width, d_ff;
  static Sizes of(const std::vector<Tensor>& acts, const Tensor& keys, int64_t n_layers) {
    const int64_t batch = keys.size(1), heads = keys.size(2), d_k = keys.size(3);
    return {n_layers, acts[XS].size(0), batch, heads, d_k, heads * d_k, batch * heads * d_k, acts[HIDDENS].size(-1)};
  }
};

// Pointer to element [i][t] of a [layer, step, ...] buffer.
template <typename T>
T* at_step(const Tensor& buffer, int64_t i, int64_t t) {
  return buffer.data_ptr<T>() + (i * buffer.size(1) + t) * buffer.stride(1);
}

template <typename T>
void forward_steps_impl(const std::vector<Tensor>& layers, const std::vector<double>& eps,
                        const std::vector<Tensor>& memory_proj, const Tensor& weights, const std::vector<Tensor>& acts,
                        const Tensor& keys, const Tensor& values, const std::vector<int64_t>& starts,
                        const std::vector<int64_t>& offsets, int64_t n_prefix) {
  const auto [n_layers, seq_len, batch, heads, d_k, d_model, width, d_ff] = Sizes::of(acts, keys, layers.size() / N_FWD);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d_k)));
  const Tensor weights_c = weights.contiguous();
  const T* w = weights_c.data_ptr<T>();
  Tensor z = at::empty({batch, d_model}, keys.options());   // a LayerNorm's output, reused
  T* xs = acts[XS].data_ptr<T>();
  for (int64_t t = 0; t < seq_len; ++t) {
    const int64_t n = n_prefix + t, start = starts[t], m = n - start;
    T* xs_t = xs + t * (n_layers + 1) * width;      // [n_layers + 1, batch, d_model]
    for (int64_t i = 0; i < n_layers; ++i) {
      const Tensor* L = layers.data() + i * N_FWD;
      const T* x = xs_t + i * width;
      T* x_mid = at_step<T>(acts[MIDS], i, t);
      if (m > 0) {
        layer_norm<T>(x, L[G1].data_ptr<T>(), L[B1].data_ptr<T>(), eps[2 * i], batch, d_model, z.data_ptr<T>(),
                      at_step<T>(acts[MEAN1], i, t), at_step<T>(acts[RSTD1], i, t));
        const Tensor q = linear(z, L[WQ], L[WQ_P], Tensor());
        T* q_buf = at_step<T>(acts[QUERIES], i, t);
        std::copy(q.data_ptr<T>(), q.data_ptr<T>() + width, q_buf);
        T* att_out = at_step<T>(acts[ATT_OUTS], i, t);
        const Shape s{batch, heads, d_k, m, L[UK].size(-1)};
        attention_forward<T>(s, keys.data_ptr<T>() + start * s.row(), values.data_ptr<T>() + start * s.row(), q_buf,
                             L[UQ].data_ptr<T>(), L[UK].data_ptr<T>(), L[SK].data_ptr<T>(), scale,
                             at_step<T>(acts[SCALED], i, t), at_step<T>(acts[ATTN], i, 0) + offsets[t] * batch * heads,
                             att_out);
        const Tensor o = linear(acts[ATT_OUTS].select(0, i).select(0, t), L[WO], L[WO_P], L[BO]);
        add<T>(o.data_ptr<T>(), x, width, x_mid);                              // x + attention
      } else {
        std::copy(x, x + width, x_mid);   // no memory yet: the attention block is skipped
      }
      layer_norm<T>(x_mid, L[G2].data_ptr<T>(), L[B2].data_ptr<T>(), eps[2 * i + 1], batch, d_model,
                    z.data_ptr<T>(), at_step<T>(acts[MEAN2], i, t), at_step<T>(acts[RSTD2], i, t));
      const Tensor h = linear(z, L[W1], L[W1_P], L[C1]);
      const T* hp = h.data_ptr<T>();
      T* hidden = at_step<T>(acts[HIDDENS], i, t);
#pragma omp simd
      for (int64_t k = 0; k < batch * d_ff; ++k) hidden[k] = hp[k] > 0 ? hp[k] : T(0);   // ReLU
      const Tensor f = linear(acts[HIDDENS].select(0, i).select(0, t), L[W2], L[W2_P], L[C2]);
      add<T>(f.data_ptr<T>(), x_mid, width, xs_t + (i + 1) * width);          // x_mid + feed-forward
    }
    // The memory vector (the layer-weighted sum of x^0 .. x^L) and its key and value, into row n.
    T* mem = acts[MEMS].data_ptr<T>() + t * width;
    std::fill(mem, mem + width, T(0));
    for (int64_t l = 0; l <= n_layers; ++l) {
      const T* x = xs_t + l * width;
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) mem[k] += w[l] * x[k];
    }
    const Tensor mem_t = acts[MEMS].select(0, t);
    const Tensor key = linear(mem_t, memory_proj[0], memory_proj[1], Tensor());
    const Tensor value = linear(mem_t, memory_proj[2], memory_proj[3], Tensor());
    std::copy(key.data_ptr<T>(), key.data_ptr<T>() + width, keys.data_ptr<T>() + n * width);
    std::copy(value.data_ptr<T>(), value.data_ptr<T>() + width, values.data_ptr<T>() + n * width);
  }
}

// The step spans must stay inside the buffers: the kernels index them without further checks.
void check_spans(const char* what, const std::vector<Tensor>& acts, const Tensor& keys, const Tensor& weights,
                 int64_t n_layers, int64_t longest, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& offsets, int64_t n_prefix) {
  const int64_t seq_len = acts[XS].size(0);
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == seq_len && static_cast<int64_t>(offsets.size()) == seq_len,
              what, ": one start and one offset per step");
  TORCH_CHECK(weights.numel() == n_layers + 1, what, ": weights must have n_layers + 1 entries");
  TORCH_CHECK(n_prefix >= 0 && n_prefix + seq_len <= keys.size(0), what, ": the steps do not fit in the memory");
  for (int64_t t = 0; t < seq_len; ++t) {
    const int64_t n = n_prefix + t, m = n - starts[t];
    TORCH_CHECK(starts[t] >= 0 && m >= 0 && m <= longest, what, ": step ", t, " sees rows ", starts[t], "..", n,
                ", beyond the ", longest, " distances of the position tables");
    TORCH_CHECK(offsets[t] >= 0 && offsets[t] + m <= acts[ATTN].size(1), what, ": step ", t,
                "'s attention weights do not fit in their buffer");
  }
}

void forward_steps(const std::vector<Tensor>& layers, const std::vector<double>& eps,
                   const std::vector<Tensor>& memory_proj, const Tensor& weights, const std::vector<Tensor>& acts,
                   const Tensor& keys, const Tensor& values, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& offsets, int64_t n_prefix) {
  TORCH_CHECK(acts.size() == N_ACT && layers.size() % N_FWD == 0 && memory_proj.size() == 4, "forward_steps: bad arguments");
  TORCH_CHECK(eps.size() == 2 * layers.size() / N_FWD, "forward_steps: two LayerNorm eps per layer");
  check_spans("forward_steps", acts, keys, weights, layers.size() / N_FWD, layers[UK].size(-1), starts, offsets,
              n_prefix);
  check_contiguous(acts, "forward_steps");
  check_contiguous(layers, "forward_steps");
  check_contiguous({keys, values}, "forward_steps");
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "forward_steps", [&] {
    forward_steps_impl<scalar_t>(layers, eps, memory_proj, weights, acts, keys, values, starts, offsets, n_prefix);
  });
}

template <typename T>
void backward_steps_impl(const std::vector<Tensor>& layers, const std::vector<Tensor>& memory_back,
                         const Tensor& weights, const std::vector<Tensor>& acts, const Tensor& keys,
                         const Tensor& values, const std::vector<Tensor>& grads, const Tensor& grad_out,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& offsets, int64_t n_prefix) {
  const auto [n_layers, seq_len, batch, heads, d_k, d_model, width, d_ff] = Sizes::of(acts, keys, layers.size() / N_BWD);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d_k)));
  const Tensor weights_c = weights.contiguous();
  const T* w = weights_c.data_ptr<T>();
  const T* xs = acts[XS].data_ptr<T>();
  Tensor g_mid_scratch = at::empty({batch, d_model}, keys.options());   // g_mid of a step without memory
  T* g_keys = grads[G_KEYS].data_ptr<T>();
  T* g_values = grads[G_VALUES].data_ptr<T>();
  for (int64_t t = seq_len - 1; t >= 0; --t) {
    const int64_t n = n_prefix + t, start = starts[t], m = n - start;
    const T* xs_t = xs + t * (n_layers + 1) * width;
    // Row n is complete: every later step has added its share. Back through key and value.
    const Tensor gk = linear(grads[G_KEYS].select(0, n).view({batch, d_model}), memory_back[0], memory_back[1], Tensor());
    const Tensor gv = linear(grads[G_VALUES].select(0, n).view({batch, d_model}), memory_back[2], memory_back[3], Tensor());
    T* g_mem = grads[G_MEMS].data_ptr<T>() + t * width;
    add<T>(gk.data_ptr<T>(), gv.data_ptr<T>(), width, g_mem);
    grads[G_WEIGHTS].addmv_(acts[XS].select(0, t).view({n_layers + 1, width}), grads[G_MEMS].select(0, t).view({-1}));
    // The memory's share of each layer's gradient is w[l] * g_mem, added where the Python loop adds g_layers[l].
    T* g = at_step<T>(grads[G_OUTS], n_layers - 1, t);
    const T* go = grad_out.data_ptr<T>() + t * width;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) g[k] = go[k] + w[n_layers] * g_mem[k];
    for (int64_t i = n_layers - 1; i >= 0; --i) {
      const Tensor* L = layers.data() + i * N_BWD;
      // x = x_mid + W_2 relu(W_1 LayerNorm(x_mid) + c_1) + c_2
      const Tensor a = linear(grads[G_OUTS].select(0, i).select(0, t).view({batch, d_model}), L[W2T], L[W2T_P], Tensor());
      const T* ap = a.data_ptr<T>();
      const T* hidden = at_step<T>(acts[HIDDENS], i, t);
      T* g_hidden = at_step<T>(grads[G_HIDDENS], i, t);
#pragma omp simd
      for (int64_t k = 0; k < batch * d_ff; ++k) g_hidden[k] = hidden[k] > 0 ? ap[k] : T(0);
      const Tensor b = linear(grads[G_HIDDENS].select(0, i).select(0, t), L[W1T], L[W1T_P], Tensor());
      T* g_z2 = at_step<T>(grads[G_Z2S], i, t);
      std::copy(b.data_ptr<T>(), b.data_ptr<T>() + width, g_z2);
      T* g_mid = m > 0 ? at_step<T>(grads[G_MIDS], i, t) : g_mid_scratch.data_ptr<T>();
      layer_norm_backward<T>(g_z2, at_step<T>(acts[MIDS], i, t), at_step<T>(acts[MEAN2], i, t),
                             at_step<T>(acts[RSTD2], i, t), L[BG2].data_ptr<T>(), batch, d_model, g, nullptr, T(0),
                             g_mid);
      T* out = i > 0 ? at_step<T>(grads[G_OUTS], i - 1, t) : grads[G_X_SEQ].data_ptr<T>() + t * width;
      if (m > 0) {
        // x_mid = x + W_o att_out + b_o, att_out = sum_j attn_j V_j
        const Tensor g_att = linear(grads[G_MIDS].select(0, i).select(0, t), L[WOT], L[WOT_P], Tensor());
        T* g_q = at_step<T>(grads[G_QS], i, t);
        const Shape s{batch, heads, d_k, m, L[BUKT].size(1)};
        const Tensor& g_scores = grads[G_SCORES];   // [layer, heads, steps, batch, M]
        attention_backward<T>(s, keys.data_ptr<T>() + start * s.row(), values.data_ptr<T>() + start * s.row(),
                              at_step<T>(acts[SCALED], i, t), at_step<T>(acts[ATTN], i, 0) + offsets[t] * batch * heads,
                              L[BUKT].data_ptr<T>(), g_att.data_ptr<T>(), scale, g_keys + start * s.row(),
                              g_values + start * s.row(),
                              g_scores.data_ptr<T>() + i * g_scores.stride(0) + t * g_scores.stride(2),
                              g_scores.stride(1), at_step<T>(grads[G_QUS], i, t), g_q);
        const Tensor c = linear(grads[G_QS].select(0, i).select(0, t).view({batch, d_model}), L[WQT], L[WQT_P], Tensor());
        T* g_z1 = at_step<T>(grads[G_Z1S], i, t);
        std::copy(c.data_ptr<T>(), c.data_ptr<T>() + width, g_z1);
        layer_norm_backward<T>(g_z1, xs_t + i * width, at_step<T>(acts[MEAN1], i, t), at_step<T>(acts[RSTD1], i, t),
                               L[BG1].data_ptr<T>(), batch, d_model, g_mid, g_mem, w[i], out);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < width; ++k) out[k] = g_mid[k] + w[i] * g_mem[k];
      }
      g = out;
    }
  }
}

void backward_steps(const std::vector<Tensor>& layers, const std::vector<Tensor>& memory_back, const Tensor& weights,
                    const std::vector<Tensor>& acts, const Tensor& keys, const Tensor& values,
                    const std::vector<Tensor>& grads, const Tensor& grad_out, const std::vector<int64_t>& starts,
                    const std::vector<int64_t>& offsets, int64_t n_prefix) {
  TORCH_CHECK(acts.size() == N_ACT && grads.size() == N_GRAD && layers.size() % N_BWD == 0 && memory_back.size() == 4,
              "backward_steps: bad arguments");
  check_spans("backward_steps", acts, keys, weights, layers.size() / N_BWD, layers[BUKT].size(1), starts, offsets,
              n_prefix);
  TORCH_CHECK(grads[G_SCORES].size(-1) == layers[BUKT].size(1), "backward_steps: score gradients of the wrong width");
  check_contiguous(acts, "backward_steps");
  check_contiguous(grads, "backward_steps");
  check_contiguous(layers, "backward_steps");
  check_contiguous({keys, values, grad_out}, "backward_steps");
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "backward_steps", [&] {
    backward_steps_impl<scalar_t>(layers, memory_back, weights, acts, keys, values, grads, grad_out, starts, offsets,
                                  n_prefix);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward_steps", &forward_steps, "fused_kv.run_steps in C++");
  module.def("backward_steps", &backward_steps, "fused_kv.run_steps_backward in C++");
}
