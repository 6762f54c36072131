// Sparse FFN kernels for CPU decoding: work on selected neurons only, reading each selected
// weight row once, in place (no gather copy). Weights are row-major [neurons, hidden]
// (the down projection stored neuron-major, i.e. transposed), fp32 or bf16; activations fp32.
//
//   rows_dot(W, x, idx)   -> y[b, j] = dot(W[idx[j]], x[b])        (gate / up for chosen neurons)
//   rows_axpy(W, v, idx)  -> y[b]    = sum_j v[b, j] * W[idx[j]]   (down for chosen neurons)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
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
    for (int64_t j = begin; j < end; ++j) {
      const T* row = w + idx[j] * hidden;
      if (j + 2 < end) __builtin_prefetch(w + idx[j + 2] * hidden);
      for (int64_t b = 0; b < batch; ++b) y[b * k + j] = dot(row, x + b * hidden, hidden);
    }
  });
}

template <typename T>
void rows_axpy_impl(const T* w, const float* v, const int64_t* idx, float* y, int64_t batch, int64_t k, int64_t hidden) {
  // threads own slices of the output; each streams the slice of every selected row
  const int64_t grain = 256;
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
  if (w.scalar_type() == torch::kFloat32)
    rows_dot_impl(w.data_ptr<float>(), x.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  else
    rows_dot_impl(w.data_ptr<at::BFloat16>(), x.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  return y;
}

torch::Tensor rows_axpy(torch::Tensor w, torch::Tensor v, torch::Tensor idx) {
  check(w, v, idx, idx.size(0));
  const int64_t batch = v.size(0), k = idx.size(0), hidden = w.size(1);
  auto y = torch::zeros({batch, hidden}, v.options());
  if (w.scalar_type() == torch::kFloat32)
    rows_axpy_impl(w.data_ptr<float>(), v.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  else
    rows_axpy_impl(w.data_ptr<at::BFloat16>(), v.data_ptr<float>(), idx.data_ptr<int64_t>(), y.data_ptr<float>(), batch, k, hidden);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_dot", &rows_dot, "y[b, j] = dot(W[idx[j]], x[b])");
  m.def("rows_axpy", &rows_axpy, "y[b] = sum_j v[b, j] * W[idx[j]]");
}
