// cpu.h - CPU kernels of ringreduce (single thread; the caller releases the GIL).
#pragma once
#include <stdint.h>

namespace rr {

struct CompressArgs {
  int fmt;            // Format
  const void* x;      // n elements of dtype xdtype (DT_F32, DT_F16 or DT_BF16)
  int xdtype;
  int64_t n;
  uint8_t* out;       // packed_nbytes(fmt, n, block_size) bytes
  float* residual;    // n floats, or nullptr
  int64_t block_size;
  bool has_clip;
  float clip;         // > 0, used when has_clip
  bool stochastic;
  uint64_t seed, counter, offset;
  float divisor = 1.0f;  // != 1: v = x / divisor (fp32) before the residual is added
  void* values = nullptr;  // or n elements of vdtype: receives dequant(out), as decompress
  int vdtype = 0;          // would write it (DT_F32, DT_F16 or DT_BF16)
};

struct CpuKernels {
  // Returns the number of blocks that contained NaN/Inf (-1: out of memory).
  int64_t (*compress)(const CompressArgs& a);
  // out: n elements of odtype (DT_F32, DT_F16 or DT_BF16); divisor != 1: out = dequant / divisor
  // (fp32), then rounded to odtype.
  void (*decompress)(int fmt, const uint8_t* packed, int64_t n, void* out, int odtype,
                     int64_t block_size, float divisor);
  // acc[i] = acc[i] + alpha * dequant[i]
  void (*decompress_accumulate)(int fmt, const uint8_t* packed, int64_t n, float* acc,
                                float alpha, int64_t block_size);
  // dst = op(dst, src), element-wise, n elements of dtype.
  void (*reduce)(int op, int dtype, void* dst, const void* src, int64_t n);
};

// One build of cpu.cpp per instruction set; all give identical results.
CpuKernels cpu_kernels_baseline();
CpuKernels cpu_kernels_avx2();
CpuKernels cpu_kernels_avx512();

}  // namespace rr
