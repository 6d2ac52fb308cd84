// cpu_avx2.cpp - cpu.cpp built for avx2 (selected at import when the CPU has it,
// with F16C for the fp16 conversions).
// Only the target changes: the results are bit-identical to the baseline build.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RR_ISA avx2
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RR_F16C 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#include "cpu.cpp"
#pragma clang attribute pop
#else
#pragma GCC target("avx2,f16c")
#include "cpu.cpp"
#endif
#else
#include "cpu.cpp"  // not x86: a second copy of the baseline, never selected
#endif
