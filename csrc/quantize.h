// quantize.h - the per-element and per-block math of ringreduce's compression
// formats, shared by the CPU (cpu.cpp) and CUDA (cuda.cu) kernels so both
// produce bit-identical bytes.
//
// Everything here is plain IEEE fp32 arithmetic (one rounding per operation,
// no fused multiply-add: compile with -ffp-contract=off / --fmad=false) and
// integer bit manipulation, so the result does not depend on the compiler,
// the SIMD width or the device.  docs/kernels.md documents the wire formats.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define RR_HD __host__ __device__ __forceinline__
#else
// static: each CPU instruction-set build keeps its own copy (see cpu.cpp).
#define RR_HD static inline
#endif

namespace rr {

// Format and dtype codes (must match ringreduce/kernels.py).
enum Format : int { FMT_FP16 = 0, FMT_BF16 = 1, FMT_INT8 = 2, FMT_INT4 = 3, FMT_ONEBIT = 4 };
enum DType : int {
  DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3,
  DT_I8 = 4, DT_U8 = 5, DT_I32 = 6, DT_I64 = 7
};
enum Op : int { OP_SUM = 0, OP_MIN = 1, OP_MAX = 2 };

// Partial sums/maxima of a block are kept in this many lanes: lane j takes
// elements j, j+32, j+64, ... in order, then lanes are folded 16, 8, 4, 2, 1
// (lane j += lane j+off).  A CUDA warp computes exactly this with shuffles.
constexpr int kLanes = 32;

// Blocks whose max |v| (int8/int4) or mean |v| (onebit) is below this are
// encoded as all zeros with scale 0; the values go to the residual.  It keeps
// 127/amax finite.
constexpr float kTiny = 7.8886090522101181e-31f;  // 2^-100

RR_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}
RR_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}

RR_HD bool is_nan(float v) { return v != v; }
RR_HD float abs_f(float v) { return bits_f32(f32_bits(v) & 0x7fffffffu); }

// ---- fp16 / bf16 conversions (round to nearest even) -----------------------

// fp32 -> fp16 bits, RNE; overflow -> Inf; NaN -> quiet NaN keeping the sign
// and the top 9 payload bits (0x7e00 | payload), as x86 F16C and numpy do.
RR_HD uint16_t f32_to_f16(float v) {
  uint32_t f = f32_bits(v);
  uint32_t sign = (f >> 16) & 0x8000u;
  uint32_t a = f & 0x7fffffffu;
  uint32_t o;
  if (a >= 0x47800000u) {                    // >= 65536, Inf or NaN
    o = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : 0x7c00u;
  } else if (a < 0x38800000u) {              // below 2^-14: subnormal or zero
    // Adding 0.5 aligns the mantissa so the FPU does the RNE shift for us.
    float t = bits_f32(a) + 0.5f;
    o = f32_bits(t) - 0x3f000000u;
  } else {                                   // normal (may round up to Inf)
    uint32_t odd = (a >> 13) & 1u;
    o = (a - 0x38000000u + 0xfffu + odd) >> 13;
  }
  return (uint16_t)(o | sign);
}

RR_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
  uint32_t m = (uint32_t)h & 0x3ffu;
  uint32_t o;
  if (e == 0x1fu) {
    o = 0x7f800000u | (m << 13);
  } else if (e == 0) {
    // m * 2^-24 is exact in fp32.
    o = f32_bits((float)m * 5.9604644775390625e-8f);
  } else {
    o = ((e + 112u) << 23) | (m << 13);
  }
  return bits_f32(o | sign);
}

// fp32 -> bf16 bits, RNE; NaN -> sign | 0x7fc0 (the canonical quiet NaN, as
// ml_dtypes does).
RR_HD uint16_t f32_to_bf16(float v) {
  uint32_t f = f32_bits(v);
  if ((f & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((f >> 16) & 0x8000u) | 0x7fc0u);
  return (uint16_t)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

RR_HD float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// ---- rounding --------------------------------------------------------------

// Round to nearest even for |t| < 2^22: adding and removing 1.5*2^23 leaves
// the FPU's RNE of t (needs no SSE4.1 and is the same on the GPU).
RR_HD float round_rne(float t) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  float r = t + magic;
  return r - magic;
}

// floor(t) for |t| < 2^22 with the same trick.
RR_HD float floor_small(float t) {
  float r = round_rne(t);
  return r > t ? r - 1.0f : r;
}

// ---- counter-based RNG -----------------------------------------------------

// splitmix64's finaliser (Steele, Lea, Flood 2014).
RR_HD uint64_t mix64(uint64_t z) {
  z ^= z >> 30; z *= 0xbf58476d1ce4e5b9ull;
  z ^= z >> 27; z *= 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

// Per-call key from (seed, counter); computed once per call.
RR_HD uint64_t rng_key(uint64_t seed, uint64_t counter) {
  return mix64(seed ^ mix64(counter + kGolden));
}

// Uniform in [0, 1) with 24 random bits for element `index` (offset + i).
RR_HD float rng_uniform(uint64_t key, uint64_t index) {
  uint64_t r = mix64(key + kGolden * (index + 1));
  return (float)(uint32_t)(r >> 40) * 5.9604644775390625e-8f;  // * 2^-24
}

// ---- per-element quantisation ----------------------------------------------

// Clip a finite v to [-c, c]; NaN and +-Inf pass through unchanged so the
// block is still seen as non-finite.
RR_HD float clip_value(float v, float c) {
  float a = abs_f(v);
  bool clip = (a > c) & (a <= 3.4028234663852886e38f);
  return clip ? bits_f32((f32_bits(v) & 0x80000000u) | f32_bits(c)) : v;
}

// Integer level for int8 (qmax 127) / int4 (qmax 7): v * inv with inv =
// qmax / amax, rounded to nearest even or stochastically (floor(t + u)),
// clamped to [-qmax, qmax].
RR_HD float quant_level(float v, float inv, float qmax, bool stochastic, float u) {
  float t = v * inv;
  float q = stochastic ? floor_small(t + u) : round_rne(t);
  q = q > qmax ? qmax : q;
  q = q < -qmax ? -qmax : q;
  return q;
}

// Onebit: bit 1 means +scale.  Nearest: v >= 0.  Stochastic: 1 with
// probability clamp(0.5 + 0.5 * v / scale, 0, 1), i.e. u < p.
RR_HD uint32_t onebit_bit(float v, float inv, bool stochastic, float u) {
  if (!stochastic) return v >= 0.0f ? 1u : 0u;
  float p = 0.5f + 0.5f * (v * inv);
  return u < p ? 1u : 0u;
}

// Bytes of the packed form of n elements.
RR_HD int64_t num_blocks(int64_t n, int64_t B) { return (n + B - 1) / B; }

RR_HD int64_t packed_nbytes(int fmt, int64_t n, int64_t B) {
  switch (fmt) {
    case FMT_FP16: case FMT_BF16: return 2 * n;
    case FMT_INT8: return 4 * num_blocks(n, B) + n;
    case FMT_INT4: return 4 * num_blocks(n, B) + (n + 1) / 2;
    case FMT_ONEBIT: return 4 * num_blocks(n, B) + (n + 7) / 8;
  }
  return -1;
}

// Level -> value of a block-scaled format.
RR_HD float dequant_level(float q, float scale) { return q * scale; }

RR_HD float scale_for(int fmt, float amax, float abs_sum, int64_t count) {
  if (fmt == FMT_ONEBIT) {
    float s = abs_sum / (float)count;
    return s < kTiny ? 0.0f : s;
  }
  if (amax < kTiny) return 0.0f;
  return amax / (fmt == FMT_INT8 ? 127.0f : 7.0f);
}

// Multiplier used to quantise: qmax / amax (int8/int4), 1 / scale (onebit).
RR_HD float inv_for(int fmt, float amax, float scale) {
  if (scale == 0.0f) return 0.0f;
  if (fmt == FMT_ONEBIT) return 1.0f / scale;
  return (fmt == FMT_INT8 ? 127.0f : 7.0f) / amax;
}

}  // namespace rr
