// cpu.cpp - single-threaded CPU kernels: fused compress (quantise + pack +
// error feedback), decompress, decompress-accumulate and element-wise reduce.
//
// Each quantisation block is staged once in a small L1-resident buffer, so
// memory is read and written once; all loops are branch-free per element so
// the compiler can vectorise them.  The math itself lives in quantize.h.
//
// This file is compiled once per instruction set: cpu_avx2.cpp and
// cpu_avx512.cpp include it under a target pragma with RR_ISA set, and
// bindings.cpp picks one at import.  Every function here and in quantize.h
// has internal linkage, so the copies never mix; they give identical bytes
// because fp32 operations round the same at any vector width (no FMA, no
// reassociation).  No std:: templates here for the same reason.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "quantize.h"

// The avx2 / avx512 builds define RR_F16C (and RR_AVX512) and include
// <immintrin.h> before this file: the fp16 conversions then use the F16C /
// AVX-512F instructions (vcvtps2ph / vcvtph2ps), which give the same bits as
// quantize.h's scalar code (checked exhaustively by tests/test_kernels.py).
// Everything else is plain C++ the compiler vectorises.

#ifndef RR_ISA
#define RR_ISA baseline
#endif
#define RR_CAT2(a, b) a##_##b
#define RR_CAT(a, b) RR_CAT2(a, b)

namespace rr {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Scratch of one block, freed on scope exit.
struct Scratch {
  void* p;
  explicit Scratch(size_t bytes) : p(malloc(bytes)) {}
  ~Scratch() { free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- fp16 / bf16 conversions of whole arrays ---------------------------------
//
// Branch-free forms of quantize.h's f32_to_f16 / f16_to_f32 / f32_to_bf16 (the
// same bits for every input: every branch is computed and one is selected), so
// the loops below vectorise in every build.  Signed compares: all operands are
// below 2^31.

inline uint32_t f32_to_f16_sel(uint32_t f) {
  const uint32_t sign = (f >> 16) & 0x8000u;
  const int32_t a = (int32_t)(f & 0x7fffffffu);
  const uint32_t big = a > 0x7f800000 ? (0x7e00u | (((uint32_t)a >> 13) & 0x3ffu)) : 0x7c00u;
  const uint32_t sub = f32_bits(bits_f32((uint32_t)a) + 0.5f) - 0x3f000000u;
  const uint32_t nrm = ((uint32_t)a - 0x38000000u + 0xfffu + (((uint32_t)a >> 13) & 1u)) >> 13;
  const uint32_t o = a >= 0x47800000 ? big : (a < 0x38800000 ? sub : nrm);
  return o | sign;
}

inline uint32_t f16_to_f32_sel(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  const uint32_t sub = f32_bits((float)(int32_t)m * 5.9604644775390625e-8f);
  const uint32_t o = e == 0x1fu ? (0x7f800000u | (m << 13))
                     : (e == 0 ? sub : (((e + 112u) << 23) | (m << 13)));
  return o | sign;
}

inline uint32_t f32_to_bf16_sel(uint32_t f) {
  const uint32_t nan = ((f >> 16) & 0x8000u) | 0x7fc0u;
  const uint32_t rne = (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
  return (int32_t)(f & 0x7fffffffu) > 0x7f800000 ? nan : rne;
}

// Whether any of the 16 halves at h has exponent bits all ones (Inf/NaN).
#if defined(RR_F16C)
inline bool any_f16_special(const uint16_t* h) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
  const __m256i e = _mm256_set1_epi16(0x7c00);
  return _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_and_si256(v, e), e)) != 0;
}
#endif

// h[i] = fp16 bits of v[i] (RNE), i < n.
inline void f32_to_f16_n(const float* v, uint16_t* h, int64_t n) {
  int64_t i = 0;
#if defined(RR_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(v + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(RR_F16C)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) {
    uint32_t f;
    memcpy(&f, v + i, 4);
    h[i] = (uint16_t)f32_to_f16_sel(f);
  }
}

// v[i] = fp32 value of fp16 bits h[i], i < n.  vcvtph2ps quiets a signalling
// NaN, the scalar code keeps it: groups holding an Inf/NaN take the scalar form.
inline void f16_to_f32_n(const uint16_t* h, float* v, int64_t n) {
  int64_t i = 0;
#if defined(RR_AVX512)
  for (; i + 16 <= n; i += 16) {
    if (any_f16_special(h + i)) break;
    _mm512_storeu_ps(v + i, _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  }
#elif defined(RR_F16C)
  for (; i + 16 <= n; i += 16) {
    if (any_f16_special(h + i)) break;
    _mm256_storeu_ps(v + i, _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    _mm256_storeu_ps(v + i + 8, _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i + 8))));
  }
#endif
  for (; i < n; ++i) {
    const uint32_t f = f16_to_f32_sel(h[i]);
    memcpy(v + i, &f, 4);
  }
}

inline void f32_to_bf16_n(const float* v, uint16_t* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t f;
    memcpy(&f, v + i, 4);
    h[i] = (uint16_t)f32_to_bf16_sel(f);
  }
}

inline void bf16_to_f32_n(const uint16_t* h, float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t f = (uint32_t)h[i] << 16;
    memcpy(v + i, &f, 4);
  }
}

template <int DT>
inline void half_to_f32_n(const uint16_t* h, float* v, int64_t n) {
  if constexpr (DT == DT_F16) f16_to_f32_n(h, v, n);
  else bf16_to_f32_n(h, v, n);
}

template <int DT>
inline void f32_to_half_n(const float* v, uint16_t* h, int64_t n) {
  if constexpr (DT == DT_F16) f32_to_f16_n(v, h, n);
  else f32_to_bf16_n(v, h, n);
}

// Elements per tile of the half-type loops: a few L1-resident scratch arrays.
constexpr int64_t kTile = 512;

template <int XDT>
inline float load_x(const void* x, int64_t i) {
  if constexpr (XDT == DT_F32) {
    return static_cast<const float*>(x)[i];
  } else if constexpr (XDT == DT_F16) {
    return bits_f32(f16_to_f32_sel(static_cast<const uint16_t*>(x)[i]));
  } else {
    return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  }
}

template <int ODT>
inline void store_out(void* out, int64_t i, float v) {
  if constexpr (ODT == DT_F32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (ODT == DT_F16) {
    static_cast<uint16_t*>(out)[i] = (uint16_t)f32_to_f16_sel(f32_bits(v));
  } else {
    static_cast<uint16_t*>(out)[i] = (uint16_t)f32_to_bf16_sel(f32_bits(v));
  }
}

inline void put_scale(uint8_t* out, int64_t b, float s) { memcpy(out + 4 * b, &s, 4); }

// values[start, start + m) = d[0, m) in the values' dtype, as decompress stores it.
inline void store_values(const CompressArgs& a, int64_t start, const float* d, int64_t m) {
  if (a.vdtype == DT_F32) memcpy(static_cast<float*>(a.values) + start, d, m * sizeof(float));
  else if (a.vdtype == DT_F16) f32_to_f16_n(d, static_cast<uint16_t*>(a.values) + start, m);
  else f32_to_bf16_n(d, static_cast<uint16_t*>(a.values) + start, m);
}
inline float get_scale(const uint8_t* packed, int64_t b) {
  float s;
  memcpy(&s, packed + 4 * b, 4);
  return s;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }


// v = x (/ divisor) (+ residual), clipped; staged into vb[0, m).
template <int XDT, bool RES, bool CLIP>
inline void stage_block(const CompressArgs& a, int64_t start, int64_t m, float* vb) {
  const float* res = a.residual + (RES ? start : 0);
  const float k = a.divisor;
  if constexpr (XDT == DT_F32) {
    const float* x = static_cast<const float*>(a.x) + start;
    if (k != 1.0f) {  // x / 1 == x but for a signalling NaN's quiet bit: divide only when asked
      for (int64_t i = 0; i < m; ++i) {
        float v = x[i] / k;
        if constexpr (RES) v = v + res[i];
        if constexpr (CLIP) v = clip_value(v, a.clip);
        vb[i] = v;
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        float v = x[i];
        if constexpr (RES) v = v + res[i];
        if constexpr (CLIP) v = clip_value(v, a.clip);
        vb[i] = v;
      }
    }
  } else {
    half_to_f32_n<XDT>(static_cast<const uint16_t*>(a.x) + start, vb, m);
    if (k != 1.0f)
      for (int64_t i = 0; i < m; ++i) vb[i] = vb[i] / k;
    for (int64_t i = 0; i < m; ++i) {
      float v = vb[i];
      if constexpr (RES) v = v + res[i];
      if constexpr (CLIP) v = clip_value(v, a.clip);
      vb[i] = v;
    }
  }
}

// int8 / int4 / onebit.
template <int FMT, int XDT, bool RES, bool CLIP, bool STOCH>
int64_t compress_scaled(const CompressArgs& a) {
  const int64_t n = a.n, B = a.block_size, nb = num_blocks(n, B);
  uint8_t* payload = a.out + 4 * nb;
  const uint64_t key = rng_key(a.seed, a.counter);
  const float qmax = FMT == FMT_INT8 ? 127.0f : 7.0f;
  Scratch vbuf(sizeof(float) * (round_up(B, kLanes) + kLanes));
  Scratch lbuf(round_up(B, 8) + 8);  // levels (int8/int4) or bits (onebit)
  if (!vbuf.p || !lbuf.p) return -1;
  float* vb = static_cast<float*>(vbuf.p);
  int8_t* lv = static_cast<int8_t*>(lbuf.p);
  int64_t bad_blocks = 0;

  for (int64_t b = 0; b < nb; ++b) {
    const int64_t start = b * B, m = min64(B, n - start);
    stage_block<XDT, RES, CLIP>(a, start, m, vb);
    const int64_t mpad = round_up(m, kLanes);
    for (int64_t i = m; i < mpad; ++i) vb[i] = 0.0f;

    // Block statistics in kLanes lanes (see quantize.h for the order).
    float lmax[kLanes], lsum[kLanes], lbad[kLanes];
    for (int j = 0; j < kLanes; ++j) lmax[j] = lsum[j] = lbad[j] = 0.0f;
    for (int64_t k = 0; k < mpad; k += kLanes) {
      const float* p = vb + k;
      for (int j = 0; j < kLanes; ++j) {
        float v = p[j], av = abs_f(v);
        if constexpr (FMT == FMT_ONEBIT) lsum[j] = lsum[j] + av;
        else lmax[j] = av > lmax[j] ? av : lmax[j];
        lbad[j] = lbad[j] + (v - v);  // 0 for finite, NaN for NaN/Inf
      }
    }
    for (int off = kLanes / 2; off > 0; off /= 2) {
      for (int j = 0; j < off; ++j) {
        lsum[j] = lsum[j] + lsum[j + off];
        lmax[j] = lmax[j + off] > lmax[j] ? lmax[j + off] : lmax[j];
        lbad[j] = lbad[j] + lbad[j + off];
      }
    }

    int64_t pbytes, pstart;  // payload bytes of this block
    if constexpr (FMT == FMT_INT8) { pstart = start; pbytes = m; }
    else if constexpr (FMT == FMT_INT4) { pstart = start / 2; pbytes = (m + 1) / 2; }
    else { pstart = start / 8; pbytes = (m + 7) / 8; }
    uint8_t* pout = payload + pstart;

    if (is_nan(lbad[0])) {  // non-finite block: NaN scale, zero payload, reset residual
      const float nan_scale = bits_f32(0x7fc00000u);
      put_scale(a.out, b, nan_scale);
      memset(pout, 0, pbytes);
      if constexpr (RES) memset(a.residual + start, 0, m * sizeof(float));
      if (a.values) {  // what decompress makes of level 0 / bit 0 at a NaN scale
        const float d = FMT == FMT_ONEBIT ? -nan_scale : dequant_level(0.0f, nan_scale);
        for (int64_t i = 0; i < m; ++i) vb[i] = d;
        store_values(a, start, vb, m);
      }
      ++bad_blocks;
      continue;
    }
    const float scale = scale_for(FMT, lmax[0], lsum[0], m);
    const float inv = inv_for(FMT, lmax[0], scale);
    put_scale(a.out, b, scale);

    float* res = a.residual + (RES ? start : 0);
    for (int64_t i = 0; i < m; ++i) {
      float u = 0.0f;
      if constexpr (STOCH) u = rng_uniform(key, a.offset + start + i);
      float v = vb[i], d;
      if constexpr (FMT == FMT_ONEBIT) {
        uint32_t bit = onebit_bit(v, inv, STOCH, u);
        lv[i] = (int8_t)bit;
        d = bit ? scale : -scale;
      } else {
        float q = quant_level(v, inv, qmax, STOCH, u);
        lv[i] = (int8_t)(int32_t)q;
        d = dequant_level(q, scale);
      }
      if constexpr (RES) res[i] = v - d;
      vb[i] = d;  // v is used up: keep what decompress will decode (levels are exact)
    }
    if (a.values) store_values(a, start, vb, m);

    if constexpr (FMT == FMT_INT8) {
      memcpy(pout, lv, m);
    } else if constexpr (FMT == FMT_INT4) {
      lv[m] = 0;
      for (int64_t j = 0; j < pbytes; ++j)
        pout[j] = (uint8_t)((lv[2 * j] & 0xf) | ((lv[2 * j + 1] & 0xf) << 4));
    } else {
      for (int64_t i = m; i < m + 8; ++i) lv[i] = 0;
      for (int64_t j = 0; j < pbytes; ++j) {
        const int8_t* s = lv + 8 * j;
        pout[j] = (uint8_t)(s[0] | (s[1] << 1) | (s[2] << 2) | (s[3] << 3) | (s[4] << 4) |
                            (s[5] << 5) | (s[6] << 6) | (s[7] << 7));
      }
    }
  }
  return bad_blocks;
}

// fp16 / bf16: element-wise RNE; blocks only decide the non-finite count and
// the residual reset.  Each block goes through in tiles: stage v, convert to the
// half type, convert back, residual = v - back, copy the bits out.
template <int FMT, int XDT, bool RES, bool CLIP>
int64_t compress_half(const CompressArgs& a) {
  const int64_t n = a.n, B = a.block_size, nb = num_blocks(n, B);
  constexpr int HDT = FMT == FMT_FP16 ? DT_F16 : DT_BF16;
  constexpr uint16_t kExp = FMT == FMT_FP16 ? 0x7c00u : 0x7f80u;
  alignas(64) float vb[kTile];
  alignas(64) float db[kTile];
  alignas(64) uint16_t hb[kTile];
  int64_t bad_blocks = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t start = b * B, m = min64(B, n - start);
    uint32_t exp_all_ones = 0;
    for (int64_t t = start; t < start + m; t += kTile) {
      const int64_t k = min64(kTile, start + m - t);
      stage_block<XDT, RES, CLIP>(a, t, k, vb);
      f32_to_half_n<HDT>(vb, hb, k);
      half_to_f32_n<HDT>(hb, db, k);
      uint32_t ones = 0;
      for (int64_t i = 0; i < k; ++i) ones |= (uint32_t)((hb[i] & kExp) == kExp);
      exp_all_ones |= ones;
      if constexpr (RES) {
        float* res = a.residual + t;
        for (int64_t i = 0; i < k; ++i) res[i] = vb[i] - db[i];
      }
      if (a.values) store_values(a, t, db, k);
      memcpy(a.out + 2 * t, hb, 2 * k);  // little-endian host; out may be unaligned
    }
    if (exp_all_ones) {
      ++bad_blocks;
      if constexpr (RES) memset(a.residual + start, 0, m * sizeof(float));
    }
  }
  return bad_blocks;
}

template <int FMT, int XDT, bool RES, bool CLIP>
int64_t compress_dispatch_stoch(const CompressArgs& a) {
  if constexpr (FMT == FMT_FP16 || FMT == FMT_BF16) {
    return compress_half<FMT, XDT, RES, CLIP>(a);  // always RNE
  } else {
    return a.stochastic ? compress_scaled<FMT, XDT, RES, CLIP, true>(a)
                        : compress_scaled<FMT, XDT, RES, CLIP, false>(a);
  }
}

template <int FMT, int XDT>
int64_t compress_dispatch_flags(const CompressArgs& a) {
  const bool res = a.residual != nullptr;
  if (res && a.has_clip) return compress_dispatch_stoch<FMT, XDT, true, true>(a);
  if (res) return compress_dispatch_stoch<FMT, XDT, true, false>(a);
  if (a.has_clip) return compress_dispatch_stoch<FMT, XDT, false, true>(a);
  return compress_dispatch_stoch<FMT, XDT, false, false>(a);
}

template <int FMT>
int64_t compress_dispatch_x(const CompressArgs& a) {
  switch (a.xdtype) {
    case DT_F32: return compress_dispatch_flags<FMT, DT_F32>(a);
    case DT_F16: return compress_dispatch_flags<FMT, DT_F16>(a);
    default: return compress_dispatch_flags<FMT, DT_BF16>(a);
  }
}

// ---- decompress ------------------------------------------------------------

// Calls f(i, value) for every element, block by block.
template <int FMT, class F>
inline void for_each_dequant(const uint8_t* packed, int64_t n, int64_t B, F&& f) {
  const int64_t nb = num_blocks(n, B);
  if constexpr (FMT == FMT_FP16 || FMT == FMT_BF16) {
    alignas(64) uint16_t hb[kTile];
    alignas(64) float db[kTile];
    for (int64_t t = 0; t < n; t += kTile) {
      const int64_t k = min64(kTile, n - t);
      memcpy(hb, packed + 2 * t, 2 * k);  // packed may be unaligned
      half_to_f32_n<FMT == FMT_FP16 ? DT_F16 : DT_BF16>(hb, db, k);
      for (int64_t i = 0; i < k; ++i) f(t + i, db[i]);
    }
  } else {
    const uint8_t* payload = packed + 4 * nb;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t start = b * B, m = min64(B, n - start);
      const float scale = get_scale(packed, b);
      if constexpr (FMT == FMT_INT8) {
        for (int64_t i = start; i < start + m; ++i)
          f(i, dequant_level((float)(int8_t)payload[i], scale));
      } else if constexpr (FMT == FMT_INT4) {
        // Whole bytes first (two elements each, constant shifts vectorise), then the odd one.
        const uint8_t* pb = payload + start / 2;
        for (int64_t j = 0; j < m / 2; ++j) {
          const int32_t by = pb[j];
          f(start + 2 * j, dequant_level((float)(((by & 0xf) ^ 8) - 8), scale));
          f(start + 2 * j + 1, dequant_level((float)(((by >> 4) ^ 8) - 8), scale));
        }
        if (m & 1) f(start + m - 1, dequant_level((float)(((pb[m / 2] & 0xf) ^ 8) - 8), scale));
      } else {
        const uint8_t* pb = payload + start / 8;
        for (int64_t j = 0; j < m / 8; ++j) {
          const uint32_t by = pb[j];
          for (int e = 0; e < 8; ++e) f(start + 8 * j + e, ((by >> e) & 1u) ? scale : -scale);
        }
        for (int64_t k = m / 8 * 8; k < m; ++k)
          f(start + k, ((pb[k >> 3] >> (k & 7)) & 1u) ? scale : -scale);
      }
    }
  }
}

template <int FMT, int ODT>
void decompress_to(const uint8_t* packed, int64_t n, void* out, int64_t B, float k) {
  if (k != 1.0f) {  // Average folded into the pass: d / k in fp32, then rounded to ODT
    for_each_dequant<FMT>(packed, n, B, [&](int64_t i, float d) { store_out<ODT>(out, i, d / k); });
  } else {
    for_each_dequant<FMT>(packed, n, B, [&](int64_t i, float d) { store_out<ODT>(out, i, d); });
  }
}

template <int FMT>
void decompress_fmt(const uint8_t* packed, int64_t n, void* out, int odt, int64_t B, float k) {
  switch (odt) {
    case DT_F32: decompress_to<FMT, DT_F32>(packed, n, out, B, k); break;
    case DT_F16: decompress_to<FMT, DT_F16>(packed, n, out, B, k); break;
    default: decompress_to<FMT, DT_BF16>(packed, n, out, B, k);
  }
}

template <int FMT>
void accumulate_fmt(const uint8_t* packed, int64_t n, float* acc, float alpha, int64_t B) {
  if (alpha == 1.0f) {  // x * 1 == x exactly, so skipping the multiply changes nothing
    for_each_dequant<FMT>(packed, n, B, [&](int64_t i, float d) { acc[i] = acc[i] + d; });
  } else {
    for_each_dequant<FMT>(packed, n, B,
                          [&](int64_t i, float d) { acc[i] = acc[i] + alpha * d; });
  }
}

// ---- reduce ----------------------------------------------------------------

// numpy's semantics: NaN propagates; otherwise the smaller (larger) value.
inline float fmin_np(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (b < a ? b : a)); }
inline float fmax_np(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (b > a ? b : a)); }
inline double dmin_np(double a, double b) { return a != a ? a : (b != b ? b : (b < a ? b : a)); }
inline double dmax_np(double a, double b) { return a != a ? a : (b != b ? b : (b > a ? b : a)); }

template <class T, int OP>
void reduce_plain(T* d, const T* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (OP == OP_SUM) d[i] = d[i] + s[i];
    else if constexpr (OP == OP_MIN) d[i] = s[i] < d[i] ? s[i] : d[i];
    else d[i] = s[i] > d[i] ? s[i] : d[i];
  }
}

// Integer sum wraps around like numpy (done in unsigned to avoid UB).
template <class T, class U, int OP>
void reduce_int(T* d, const T* s, int64_t n) {
  if constexpr (OP == OP_SUM) {
    for (int64_t i = 0; i < n; ++i) d[i] = (T)(U)((U)d[i] + (U)s[i]);
  } else {
    reduce_plain<T, OP>(d, s, n);
  }
}

template <int OP>
void reduce_f32(float* d, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (OP == OP_SUM) d[i] = d[i] + s[i];
    else if constexpr (OP == OP_MIN) d[i] = fmin_np(d[i], s[i]);
    else d[i] = fmax_np(d[i], s[i]);
  }
}

template <int OP>
void reduce_f64(double* d, const double* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (OP == OP_SUM) d[i] = d[i] + s[i];
    else if constexpr (OP == OP_MIN) d[i] = dmin_np(d[i], s[i]);
    else d[i] = dmax_np(d[i], s[i]);
  }
}

// fp16/bf16: computed in fp32, rounded back to nearest even.
template <int DT, int OP>
void reduce_half(uint16_t* d, const uint16_t* s, int64_t n) {
  alignas(64) float fa[kTile];
  alignas(64) float fb[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t k = min64(kTile, n - t);
    half_to_f32_n<DT>(d + t, fa, k);
    half_to_f32_n<DT>(s + t, fb, k);
    for (int64_t i = 0; i < k; ++i) {
      if constexpr (OP == OP_SUM) fa[i] = fa[i] + fb[i];
      else if constexpr (OP == OP_MIN) fa[i] = fmin_np(fa[i], fb[i]);
      else fa[i] = fmax_np(fa[i], fb[i]);
    }
    f32_to_half_n<DT>(fa, d + t, k);
  }
}

template <int OP>
void reduce_op(int dtype, void* d, const void* s, int64_t n) {
  switch (dtype) {
    case DT_F32: reduce_f32<OP>((float*)d, (const float*)s, n); break;
    case DT_F64: reduce_f64<OP>((double*)d, (const double*)s, n); break;
    case DT_F16: reduce_half<DT_F16, OP>((uint16_t*)d, (const uint16_t*)s, n); break;
    case DT_BF16: reduce_half<DT_BF16, OP>((uint16_t*)d, (const uint16_t*)s, n); break;
    case DT_I8: reduce_int<int8_t, uint8_t, OP>((int8_t*)d, (const int8_t*)s, n); break;
    case DT_U8: reduce_int<uint8_t, uint8_t, OP>((uint8_t*)d, (const uint8_t*)s, n); break;
    case DT_I32: reduce_int<int32_t, uint32_t, OP>((int32_t*)d, (const int32_t*)s, n); break;
    case DT_I64: reduce_int<int64_t, uint64_t, OP>((int64_t*)d, (const int64_t*)s, n); break;
  }
}

int64_t compress_cpu(const CompressArgs& a) {
  switch (a.fmt) {
    case FMT_FP16: return compress_dispatch_x<FMT_FP16>(a);
    case FMT_BF16: return compress_dispatch_x<FMT_BF16>(a);
    case FMT_INT8: return compress_dispatch_x<FMT_INT8>(a);
    case FMT_INT4: return compress_dispatch_x<FMT_INT4>(a);
    default: return compress_dispatch_x<FMT_ONEBIT>(a);
  }
}

void decompress_cpu(int fmt, const uint8_t* packed, int64_t n, void* out, int odt, int64_t B,
                    float k) {
  switch (fmt) {
    case FMT_FP16: decompress_fmt<FMT_FP16>(packed, n, out, odt, B, k); break;
    case FMT_BF16: decompress_fmt<FMT_BF16>(packed, n, out, odt, B, k); break;
    case FMT_INT8: decompress_fmt<FMT_INT8>(packed, n, out, odt, B, k); break;
    case FMT_INT4: decompress_fmt<FMT_INT4>(packed, n, out, odt, B, k); break;
    default: decompress_fmt<FMT_ONEBIT>(packed, n, out, odt, B, k);
  }
}

void decompress_accumulate_cpu(int fmt, const uint8_t* packed, int64_t n, float* acc,
                               float alpha, int64_t B) {
  switch (fmt) {
    case FMT_FP16: accumulate_fmt<FMT_FP16>(packed, n, acc, alpha, B); break;
    case FMT_BF16: accumulate_fmt<FMT_BF16>(packed, n, acc, alpha, B); break;
    case FMT_INT8: accumulate_fmt<FMT_INT8>(packed, n, acc, alpha, B); break;
    case FMT_INT4: accumulate_fmt<FMT_INT4>(packed, n, acc, alpha, B); break;
    default: accumulate_fmt<FMT_ONEBIT>(packed, n, acc, alpha, B);
  }
}

void reduce_cpu(int op, int dtype, void* dst, const void* src, int64_t n) {
  switch (op) {
    case OP_SUM: reduce_op<OP_SUM>(dtype, dst, src, n); break;
    case OP_MIN: reduce_op<OP_MIN>(dtype, dst, src, n); break;
    default: reduce_op<OP_MAX>(dtype, dst, src, n);
  }
}

}  // namespace

CpuKernels RR_CAT(cpu_kernels, RR_ISA)() {
  return CpuKernels{&compress_cpu, &decompress_cpu, &decompress_accumulate_cpu, &reduce_cpu};
}

}  // namespace rr
