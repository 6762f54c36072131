// Sparse FFN kernels for CPU decoding: work on selected neurons only, reading each selected
// weight row once, in place (no gather copy). Weights are row-major [neurons, hidden]
// (the down projection stored neuron-major, i.e. transposed), fp32 or bf16; activations fp32.
//
//   rows_dot(W, x, idx)   -> y[b, j] = dot(W[idx[j]], x[b])        (gate / up for chosen neurons)
//   rows_axpy(W, v, idx)  -> y[b]    = sum_j v[b, j] * W[idx[j]]   (down for chosen neurons)
//   gate_up(Wg, Wu, x, t) -> (g, u)  g = x Wg^T for all neurons; u = x Wu^T where any g > t, else 0
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline float dot_generic(const T* __restrict w, const float* __restrict x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += to_float(w[i + k]) * x[i + k];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += to_float(w[i]) * x[i];
  return s;
}

template <typename T>
inline void axpy_generic(float a, const T* __restrict w, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(w[i]);
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
inline float dot(const T* __restrict w, const float* __restrict x, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(load16(w + i), _mm512_loadu_ps(x + i), a0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += to_float(w[i]) * x[i];
  return s;
}

// two rows against one x: two memory streams in flight, x loaded once
template <typename T>
inline void dot2(const T* __restrict w0, const T* __restrict w1, const float* __restrict x, int64_t n, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_fmadd_ps(load16(w0 + i), x0, a0);
    b0 = _mm512_fmadd_ps(load16(w1 + i), x0, b0);
    a1 = _mm512_fmadd_ps(load16(w0 + i + 16), x1, a1);
    b1 = _mm512_fmadd_ps(load16(w1 + i + 16), x1, b1);
  }
  float s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), s1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  for (; i < n; ++i) {
    s0 += to_float(w0[i]) * x[i];
    s1 += to_float(w1[i]) * x[i];
  }
  out[0] = s0;
  out[1] = s1;
}
#define RELUFY_HAVE_DOT2 1

// eight consecutive rows against one x: eight memory streams in flight
template <typename T>
inline void dot8(const T* __restrict w, int64_t stride, const float* __restrict x, int64_t n, float* out) {
  __m512 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(load16(w + r * stride + i), xv, a[r]);
  }
  for (int r = 0; r < 8; ++r) {
    float s = _mm512_reduce_add_ps(a[r]);
    for (int64_t t = i; t < n; ++t) s += to_float(w[r * stride + t]) * x[t];
    out[r] = s;
  }
}

template <typename T>
inline void axpy(float a, const T* __restrict w, float* __restrict y, int64_t n) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(w + i), _mm512_loadu_ps(y + i)));
    _mm512_storeu_ps(y + i + 16, _mm512_fmadd_ps(va, load16(w + i + 16), _mm512_loadu_ps(y + i + 16)));
  }
  for (; i < n; ++i) y[i] += a * to_float(w[i]);
}
#else
template <typename T>
inline float dot(const T* __restrict w, const float* __restrict x, int64_t n) { return dot_generic(w, x, n); }
template <typename T>
inline void axpy(float a, const T* __restrict w, float* __restrict y, int64_t n) { axpy_generic(a, w, y, n); }
#endif

template <typename T>
void rows_dot_impl(const T* w, const float* x, const int64_t* idx, float* y, int64_t batch, int64_t k, int64_t hidden) {
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
#ifdef RELUFY_HAVE_DOT2
    for (; j + 2 <= end; j += 2) {
      for (int64_t b = 0; b < batch; ++b) {
        float out[2];
        dot2(w + idx[j] * hidden, w + idx[j + 1] * hidden, x + b * hidden, hidden, out);
        y[b * k + j] = out[0];
        y[b * k + j + 1] = out[1];
      }
    }
#endif
    for (; j < end; ++j) {
      const T* row = w + idx[j] * hidden;
      for (int64_t b = 0; b < batch; ++b) y[b * k + j] = dot(row, x + b * hidden, hidden);
    }
  });
}

template <typename T>
void rows_axpy_impl(const T* w, const float* v, const int64_t* idx, float* y, int64_t batch, int64_t k, int64_t hidden) {
  // threads own slices of the output, one slice each (long contiguous reads of every selected row)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(64, ((hidden + threads - 1) / threads + 15) / 16 * 16);
  at::parallel_for(0, (hidden + grain - 1) / grain, 1, [&](int64_t begin, int64_t end) {
    const int64_t h0 = begin * grain, h1 = std::min(hidden, end * grain);
    for (int64_t j = 0; j < k; ++j) {
      const T* row = w + idx[j] * hidden + h0;
      for (int64_t b = 0; b < batch; ++b) {
        const float a = v[b * k + j];
        if (a != 0.0f) axpy(a, row, y + b * hidden + h0, h1 - h0);
      }
    }
  });
}

// gate for every neuron; up only for neurons whose gate exceeds `threshold` for some token of the
// batch, in the same pass (the up row is read right after its gate row); other up entries are 0
template <typename T>
void gate_up_impl(const T* wg, const T* wu, const float* x, float* g, float* u, int64_t batch, int64_t n, int64_t hidden,
                  float threshold) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
#ifdef RELUFY_HAVE_DOT2
    if (batch == 1) {  // decoding: gate rows in pairs, then the up rows of the active ones
      for (; j + 8 <= end; j += 8) {
        dot8(wg + j * hidden, hidden, x, hidden, g + j);
        int64_t act[8], na = 0;
        for (int r = 0; r < 8; ++r) {
          if (g[j + r] > threshold) act[na++] = j + r;
          else u[j + r] = 0.0f;
        }
        int64_t q = 0;
        for (; q + 2 <= na; q += 2) {
          float uv[2];
          dot2(wu + act[q] * hidden, wu + act[q + 1] * hidden, x, hidden, uv);
          u[act[q]] = uv[0];
          u[act[q + 1]] = uv[1];
        }
        if (q < na) u[act[q]] = dot(wu + act[q] * hidden, x, hidden);
      }
    }
#endif
    for (; j < end; ++j) {
      bool active = false;
      for (int64_t b = 0; b < batch; ++b) {
        const float v = dot(wg + j * hidden, x + b * hidden, hidden);
        g[b * n + j] = v;
        active = active || v > threshold;
      }
      for (int64_t b = 0; b < batch; ++b) u[b * n + j] = active ? dot(wu + j * hidden, x + b * hidden, hidden) : 0.0f;
    }
  });
}

// call f with a typed null pointer for w's dtype (float32 or bfloat16; check() refuses others)
template <typename F>
void by_dtype(const torch::Tensor& w, F f) {
  if (w.scalar_type() == torch::kFloat32)
    f(static_cast<float*>(nullptr));
  else
    f(static_cast<at::BFloat16*>(nullptr));
}

void check(const torch::Tensor& w, const torch::Tensor& x, const torch::Tensor& idx, int64_t cols) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "weights: contiguous 2-D CPU tensor");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16, "weights: float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "activations: contiguous float32 [batch, n]");
  TORCH_CHECK(x.size(1) == cols, "activations: wrong width");
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() && idx.scalar_type() == torch::kInt64, "indices: contiguous int64");
}

}  // namespace

torch::Tensor rows_dot(torch::Tensor w, torch::Tensor x, torch::Tensor idx) {
  check(w, x, idx, w.size(1));
  const int64_t batch = x.size(0), k = idx.size(0), hidden = w.size(1);
  auto y = torch::empty({batch, k}, x.options());
  by_dtype(w, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    rows_dot_impl(w.data_ptr<T>(), x.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  });
  return y;
}

torch::Tensor rows_axpy(torch::Tensor w, torch::Tensor v, torch::Tensor idx) {
  check(w, v, idx, idx.size(0));
  const int64_t batch = v.size(0), k = idx.size(0), hidden = w.size(1);
  auto y = torch::zeros({batch, hidden}, v.options());
  by_dtype(w, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    rows_axpy_impl(w.data_ptr<T>(), v.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  });
  return y;
}

std::vector<torch::Tensor> gate_up(torch::Tensor wg, torch::Tensor wu, torch::Tensor x, double threshold) {
  TORCH_CHECK(wg.sizes() == wu.sizes() && wg.scalar_type() == wu.scalar_type() && wu.is_contiguous(), "gate/up: same shape and dtype");
  check(wg, x, torch::empty({0}, torch::kInt64), wg.size(1));
  const int64_t batch = x.size(0), n = wg.size(0), hidden = wg.size(1);
  auto g = torch::empty({batch, n}, x.options());
  auto u = torch::empty({batch, n}, x.options());
  by_dtype(wg, [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    gate_up_impl(wg.data_ptr<T>(), wu.data_ptr<T>(), x.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(), batch, n, hidden,
                 static_cast<float>(threshold));
  });
  return {g, u};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_dot", &rows_dot, "y[b, j] = dot(W[idx[j]], x[b])");
  m.def("rows_axpy", &rows_axpy, "y[b] = sum_j v[b, j] * W[idx[j]]");
  m.def("gate_up", &gate_up, "gate for all neurons, up where some token's gate > threshold (else 0)");
}
