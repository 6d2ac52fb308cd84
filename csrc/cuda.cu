// cuda.cu - CUDA kernels of ringreduce, bit-identical to csrc/cpu.cpp.
//
// Compiled on its own by nvcc with --fmad=false and IEEE division/sqrt, so
// every fp32 operation rounds exactly as on the CPU; the math is shared
// through quantize.h.  One warp owns one quantisation block: lane j gathers
// the block statistics of elements j, j+32, ... and the warp folds them with
// shuffles in the same order as the CPU's 32 lanes.
#include <cuda_runtime.h>

#include "rr_cuda.h"
#include "quantize.h"

namespace rr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

struct DevArgs {
  int fmt;
  const void* x;
  int xdtype;
  int64_t n;
  uint8_t* out;
  float* residual;
  int64_t block_size;
  int has_clip;
  float clip;
  int stochastic;
  uint64_t key;
  uint64_t offset;
  float divisor;  // != 1: v = x / divisor (fp32) before the residual is added
  void* values;   // or n elements of vdtype receiving dequant(out), as decompress writes it
  int vdtype;
};

__device__ __forceinline__ void store_value(const DevArgs& a, int64_t i, float d) {
  if (a.vdtype == DT_F32) static_cast<float*>(a.values)[i] = d;
  else if (a.vdtype == DT_F16) static_cast<uint16_t*>(a.values)[i] = f32_to_f16(d);
  else static_cast<uint16_t*>(a.values)[i] = f32_to_bf16(d);
}

__device__ __forceinline__ float load_x(const void* x, int xdt, int64_t i) {
  if (xdt == DT_F32) return static_cast<const float*>(x)[i];
  uint16_t h = static_cast<const uint16_t*>(x)[i];
  return xdt == DT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

__device__ __forceinline__ float stage(const DevArgs& a, int64_t i) {
  float v = load_x(a.x, a.xdtype, i);
  if (a.divisor != 1.0f) v = v / a.divisor;
  if (a.residual) v = v + a.residual[i];
  if (a.has_clip) v = clip_value(v, a.clip);
  return v;
}

// Byte-wise so that `out` need not be 4-byte aligned.
__device__ __forceinline__ void put_scale(uint8_t* out, int64_t b, float s) {
  uint32_t u = f32_bits(s);
  for (int k = 0; k < 4; ++k) out[4 * b + k] = (uint8_t)(u >> (8 * k));
}
__device__ __forceinline__ float get_scale(const uint8_t* p, int64_t b) {
  uint32_t u = 0;
  for (int k = 0; k < 4; ++k) u |= (uint32_t)p[4 * b + k] << (8 * k);
  return bits_f32(u);
}

__device__ __forceinline__ float level_or_bit(int fmt, float v, float inv, float scale,
                                              bool stoch, float u, int32_t* q) {
  if (fmt == FMT_ONEBIT) {
    uint32_t bit = onebit_bit(v, inv, stoch, u);
    *q = (int32_t)bit;
    return bit ? scale : -scale;
  }
  float l = quant_level(v, inv, fmt == FMT_INT8 ? 127.0f : 7.0f, stoch, u);
  *q = (int32_t)l;
  return dequant_level(l, scale);
}

__global__ void compress_scaled_kernel(DevArgs a, unsigned long long* bad_blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t b = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int64_t B = a.block_size, nb = num_blocks(a.n, B);
  if (b >= nb) return;  // whole warp leaves together
  const int64_t start = b * B, m = (a.n - start) < B ? (a.n - start) : B;
  const int fmt = a.fmt;

  float lmax = 0.0f, lsum = 0.0f, lbad = 0.0f;
  for (int64_t k = lane; k < m; k += 32) {
    float v = stage(a, start + k), av = abs_f(v);
    if (fmt == FMT_ONEBIT) lsum = lsum + av;
    else lmax = av > lmax ? av : lmax;
    lbad = lbad + (v - v);
  }
  for (int off = 16; off > 0; off /= 2) {
    float s = __shfl_down_sync(kFull, lsum, off);
    float mx = __shfl_down_sync(kFull, lmax, off);
    float bd = __shfl_down_sync(kFull, lbad, off);
    lsum = lsum + s;
    lmax = mx > lmax ? mx : lmax;
    lbad = lbad + bd;
  }
  lsum = __shfl_sync(kFull, lsum, 0);
  lmax = __shfl_sync(kFull, lmax, 0);
  lbad = __shfl_sync(kFull, lbad, 0);

  const int64_t nbytes_block = fmt == FMT_INT8 ? m : (fmt == FMT_INT4 ? (m + 1) / 2 : (m + 7) / 8);
  const int64_t pstart = fmt == FMT_INT8 ? start : (fmt == FMT_INT4 ? start / 2 : start / 8);
  uint8_t* pout = a.out + 4 * nb + pstart;

  if (is_nan(lbad)) {
    if (lane == 0) {
      put_scale(a.out, b, bits_f32(0x7fc00000u));
      atomicAdd(bad_blocks, 1ull);
    }
    for (int64_t j = lane; j < nbytes_block; j += 32) pout[j] = 0;
    if (a.residual)
      for (int64_t k = lane; k < m; k += 32) a.residual[start + k] = 0.0f;
    if (a.values) {  // what decompress makes of level 0 / bit 0 at a NaN scale
      const float nan_scale = bits_f32(0x7fc00000u);
      const float d = fmt == FMT_ONEBIT ? -nan_scale : dequant_level(0.0f, nan_scale);
      for (int64_t k = lane; k < m; k += 32) store_value(a, start + k, d);
    }
    return;
  }
  const float scale = scale_for(fmt, lmax, lsum, m);
  const float inv = inv_for(fmt, lmax, scale);
  if (lane == 0) put_scale(a.out, b, scale);
  const bool stoch = a.stochastic != 0;

  // Lane j owns output bytes j, j+32, ... (1, 2 or 8 elements each).
  const int per = fmt == FMT_INT8 ? 1 : (fmt == FMT_INT4 ? 2 : 8);
  for (int64_t j = lane; j < nbytes_block; j += 32) {
    uint32_t byte = 0;
    for (int e = 0; e < per; ++e) {
      const int64_t k = j * per + e;
      if (k >= m) break;
      const int64_t i = start + k;
      float v = stage(a, i);
      float u = stoch ? rng_uniform(a.key, a.offset + (uint64_t)i) : 0.0f;
      int32_t q;
      float d = level_or_bit(fmt, v, inv, scale, stoch, u, &q);
      if (a.residual) a.residual[i] = v - d;
      if (a.values) store_value(a, i, d);
      if (fmt == FMT_INT8) byte = (uint32_t)q & 0xffu;
      else if (fmt == FMT_INT4) byte |= ((uint32_t)q & 0xfu) << (4 * e);
      else byte |= (uint32_t)q << e;
    }
    pout[j] = (uint8_t)byte;
  }
}

__global__ void compress_half_kernel(DevArgs a, unsigned long long* bad_blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t b = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int64_t B = a.block_size, nb = num_blocks(a.n, B);
  if (b >= nb) return;
  const int64_t start = b * B, m = (a.n - start) < B ? (a.n - start) : B;
  bool bad = false;
  for (int64_t k = lane; k < m; k += 32) {
    const int64_t i = start + k;
    float v = stage(a, i);
    uint16_t h;
    float d;
    if (a.fmt == FMT_FP16) {
      h = f32_to_f16(v); d = f16_to_f32(h); bad |= (h & 0x7c00u) == 0x7c00u;
    } else {
      h = f32_to_bf16(v); d = bf16_to_f32(h); bad |= (h & 0x7f80u) == 0x7f80u;
    }
    a.out[2 * i] = (uint8_t)h;
    a.out[2 * i + 1] = (uint8_t)(h >> 8);
    if (a.residual) a.residual[i] = v - d;
    if (a.values) store_value(a, i, d);
  }
  if (__any_sync(kFull, bad)) {
    if (lane == 0) atomicAdd(bad_blocks, 1ull);
    if (a.residual)
      for (int64_t k = lane; k < m; k += 32) a.residual[start + k] = 0.0f;
  }
}

__device__ __forceinline__ float dequant_at(int fmt, const uint8_t* p, int64_t n, int64_t B,
                                            int64_t i) {
  if (fmt == FMT_FP16 || fmt == FMT_BF16) {
    uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
    return fmt == FMT_FP16 ? f16_to_f32(h) : bf16_to_f32(h);
  }
  const int64_t nb = num_blocks(n, B);
  const float scale = get_scale(p, i / B);
  const uint8_t* payload = p + 4 * nb;
  if (fmt == FMT_INT8) return dequant_level((float)(int8_t)payload[i], scale);
  if (fmt == FMT_INT4) {
    int32_t nib = (payload[i >> 1] >> ((i & 1) * 4)) & 0xf;
    return dequant_level((float)((nib ^ 8) - 8), scale);
  }
  return ((payload[i >> 3] >> (i & 7)) & 1u) ? scale : -scale;
}

__global__ void decompress_kernel(int fmt, const uint8_t* p, int64_t n, void* out, int odt,
                                  int64_t B, float k) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float d = dequant_at(fmt, p, n, B, i);
    if (k != 1.0f) d = d / k;
    if (odt == DT_F32) static_cast<float*>(out)[i] = d;
    else if (odt == DT_F16) static_cast<uint16_t*>(out)[i] = f32_to_f16(d);
    else static_cast<uint16_t*>(out)[i] = f32_to_bf16(d);
  }
}

__global__ void accumulate_kernel(int fmt, const uint8_t* p, int64_t n, float* acc, float alpha,
                                  int64_t B) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float d = dequant_at(fmt, p, n, B, i);
    acc[i] = alpha == 1.0f ? acc[i] + d : acc[i] + alpha * d;
  }
}

__device__ __forceinline__ float fmin_np(float a, float b) {
  return is_nan(a) ? a : (is_nan(b) ? b : (b < a ? b : a));
}
__device__ __forceinline__ float fmax_np(float a, float b) {
  return is_nan(a) ? a : (is_nan(b) ? b : (b > a ? b : a));
}

template <class T, class U>
__global__ void reduce_int_kernel(int op, T* d, const T* s, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    T a = d[i], b = s[i];
    d[i] = op == OP_SUM ? (T)(U)((U)a + (U)b) : (op == OP_MIN ? (b < a ? b : a) : (b > a ? b : a));
  }
}

__global__ void reduce_f64_kernel(int op, double* d, const double* s, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    double a = d[i], b = s[i], r;
    if (op == OP_SUM) r = __dadd_rn(a, b);
    else if (op == OP_MIN) r = a != a ? a : (b != b ? b : (b < a ? b : a));
    else r = a != a ? a : (b != b ? b : (b > a ? b : a));
    d[i] = r;
  }
}

// float32, float16, bfloat16 (the halves computed in fp32, RNE back).
__global__ void reduce_f32_kernel(int op, int dt, void* dv, const void* sv, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    float a, b;
    if (dt == DT_F32) {
      a = static_cast<float*>(dv)[i]; b = static_cast<const float*>(sv)[i];
    } else {
      uint16_t ha = static_cast<uint16_t*>(dv)[i], hb = static_cast<const uint16_t*>(sv)[i];
      a = dt == DT_F16 ? f16_to_f32(ha) : bf16_to_f32(ha);
      b = dt == DT_F16 ? f16_to_f32(hb) : bf16_to_f32(hb);
    }
    float r = op == OP_SUM ? __fadd_rn(a, b) : (op == OP_MIN ? fmin_np(a, b) : fmax_np(a, b));
    if (dt == DT_F32) static_cast<float*>(dv)[i] = r;
    else static_cast<uint16_t*>(dv)[i] = dt == DT_F16 ? f32_to_f16(r) : f32_to_bf16(r);
  }
}

unsigned grid_for(int64_t n) {
  int64_t g = (n + kThreads - 1) / kThreads;
  if (g > 65535 * 8) g = 65535 * 8;  // grid-stride loops cover the rest
  return (unsigned)(g < 1 ? 1 : g);
}

}  // namespace
}  // namespace rr

using namespace rr;

extern "C" int rr_cuda_compress(int fmt, const void* x, int xdtype, int64_t n, uint8_t* out,
                                float* residual, int64_t block_size, int has_clip, float clip,
                                int stochastic, uint64_t seed, uint64_t counter,
                                uint64_t offset, float divisor, void* values, int vdtype,
                                unsigned long long* bad_blocks, void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  DevArgs a{fmt, x, xdtype, n, out, residual, block_size, has_clip, clip, stochastic,
            rng_key(seed, counter), offset, divisor, values, vdtype};
  const int64_t nb = num_blocks(n, block_size);
  const unsigned grid = (unsigned)((nb + kWarps - 1) / kWarps);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (fmt == FMT_FP16 || fmt == FMT_BF16) compress_half_kernel<<<grid, kThreads, 0, s>>>(a, bad_blocks);
  else compress_scaled_kernel<<<grid, kThreads, 0, s>>>(a, bad_blocks);
  return (int)cudaGetLastError();
}

extern "C" int rr_cuda_decompress(int fmt, const uint8_t* packed, int64_t n, void* out,
                                  int odtype, int64_t block_size, float divisor, void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  decompress_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      fmt, packed, n, out, odtype, block_size, divisor);
  return (int)cudaGetLastError();
}

extern "C" int rr_cuda_decompress_accumulate(int fmt, const uint8_t* packed, int64_t n,
                                             float* acc, float alpha, int64_t block_size,
                                             void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  accumulate_kernel<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      fmt, packed, n, acc, alpha, block_size);
  return (int)cudaGetLastError();
}

extern "C" int rr_cuda_reduce(int op, int dtype, void* dst, const void* src, int64_t n,
                              void* stream) {
  if (n <= 0) return (int)cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned g = grid_for(n);
  switch (dtype) {
    case DT_F32: case DT_F16: case DT_BF16:
      reduce_f32_kernel<<<g, kThreads, 0, s>>>(op, dtype, dst, src, n); break;
    case DT_F64:
      reduce_f64_kernel<<<g, kThreads, 0, s>>>(op, (double*)dst, (const double*)src, n); break;
    case DT_I8:
      reduce_int_kernel<int8_t, uint8_t><<<g, kThreads, 0, s>>>(op, (int8_t*)dst, (const int8_t*)src, n); break;
    case DT_U8:
      reduce_int_kernel<uint8_t, uint8_t><<<g, kThreads, 0, s>>>(op, (uint8_t*)dst, (const uint8_t*)src, n); break;
    case DT_I32:
      reduce_int_kernel<int32_t, uint32_t><<<g, kThreads, 0, s>>>(op, (int32_t*)dst, (const int32_t*)src, n); break;
    case DT_I64:
      reduce_int_kernel<int64_t, uint64_t><<<g, kThreads, 0, s>>>(op, (int64_t*)dst, (const int64_t*)src, n); break;
    default:
      return (int)cudaErrorInvalidValue;
  }
  return (int)cudaGetLastError();
}
