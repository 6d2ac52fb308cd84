// rr_cuda.h - extern "C" launchers of the CUDA kernels (csrc/cuda.cu), called by
// the pybind11 module in bindings_cuda.cpp.  Pointers are device pointers;
// every launcher enqueues on `stream` and returns a cudaError_t as int.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// bad_blocks: device pointer to one unsigned long long, incremented once per
// block that contained NaN/Inf (the caller zeroes it).  divisor != 1: the input
// is x / divisor (fp32) before the residual is added.  values (or null): n
// elements of vdtype receiving what decompress would write.
int rr_cuda_compress(int fmt, const void* x, int xdtype, int64_t n, uint8_t* out,
                     float* residual, int64_t block_size, int has_clip, float clip,
                     int stochastic, uint64_t seed, uint64_t counter, uint64_t offset,
                     float divisor, void* values, int vdtype,
                     unsigned long long* bad_blocks, void* stream);

// divisor != 1: out = dequant / divisor (fp32), then rounded to odtype.
int rr_cuda_decompress(int fmt, const uint8_t* packed, int64_t n, void* out, int odtype,
                       int64_t block_size, float divisor, void* stream);

int rr_cuda_decompress_accumulate(int fmt, const uint8_t* packed, int64_t n, float* acc,
                                  float alpha, int64_t block_size, void* stream);

int rr_cuda_reduce(int op, int dtype, void* dst, const void* src, int64_t n, void* stream);

#ifdef __cplusplus
}
#endif
