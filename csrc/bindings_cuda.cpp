// bindings_cuda.cpp - pybind11 module ringreduce._C_cuda: the CUDA kernels.
//
// Arrays arrive as raw device addresses (from __cuda_array_interface__) and
// a stream handle; ringreduce/kernels.py validates dtypes and sizes first.
// Launches are asynchronous on the given stream, except compress, which waits
// for the stream to return the count of non-finite blocks.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "rr_cuda.h"

namespace py = pybind11;

namespace {

void check(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string("ringreduce CUDA ") + what + " failed: " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

int64_t compress(int fmt, uintptr_t x, int xdtype, int64_t n, uintptr_t out, uintptr_t residual,
                 int64_t block_size, bool has_clip, float clip, bool stochastic, uint64_t seed,
                 uint64_t counter, uint64_t offset, uintptr_t stream, float divisor,
                 uintptr_t values, int vdtype) {
  if (n == 0) return 0;
  py::gil_scoped_release nogil;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  unsigned long long* dcount = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&dcount), sizeof(*dcount), s), "malloc");
  check(cudaMemsetAsync(dcount, 0, sizeof(*dcount), s), "memset");
  int err = rr_cuda_compress(fmt, ptr<const void>(x), xdtype, n, ptr<uint8_t>(out),
                             ptr<float>(residual), block_size, has_clip, clip, stochastic, seed,
                             counter, offset, divisor, ptr<void>(values), vdtype, dcount, s);
  unsigned long long count = 0;
  if (err == 0) err = cudaMemcpyAsync(&count, dcount, sizeof(count), cudaMemcpyDeviceToHost, s);
  cudaFreeAsync(dcount, s);
  if (err == 0) err = cudaStreamSynchronize(s);
  check(err, "compress");
  return (int64_t)count;
}

void decompress(int fmt, uintptr_t packed, int64_t n, uintptr_t out, int odtype,
                int64_t block_size, uintptr_t stream, float divisor) {
  py::gil_scoped_release nogil;
  check(rr_cuda_decompress(fmt, ptr<const uint8_t>(packed), n, ptr<void>(out), odtype,
                           block_size, divisor, ptr<void>(stream)),
        "decompress");
}

void decompress_accumulate(int fmt, uintptr_t packed, int64_t n, uintptr_t acc, float alpha,
                           int64_t block_size, uintptr_t stream) {
  py::gil_scoped_release nogil;
  check(rr_cuda_decompress_accumulate(fmt, ptr<const uint8_t>(packed), n, ptr<float>(acc),
                                      alpha, block_size, ptr<void>(stream)),
        "decompress_accumulate");
}

void reduce(int op, int dtype, uintptr_t dst, uintptr_t src, int64_t n, uintptr_t stream) {
  py::gil_scoped_release nogil;
  check(rr_cuda_reduce(op, dtype, ptr<void>(dst), ptr<const void>(src), n, ptr<void>(stream)),
        "reduce");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ringreduce CUDA kernels (see ringreduce.kernels for the documented API)";
  m.def("compress", &compress, py::arg("fmt"), py::arg("x"), py::arg("xdtype"), py::arg("n"),
        py::arg("out"), py::arg("residual"), py::arg("block_size"), py::arg("has_clip"),
        py::arg("clip"), py::arg("stochastic"), py::arg("seed"), py::arg("counter"),
        py::arg("offset"), py::arg("stream"), py::arg("divisor") = 1.0f,
        py::arg("values") = 0, py::arg("vdtype") = 0);
  m.def("decompress", &decompress, py::arg("fmt"), py::arg("packed"), py::arg("n"),
        py::arg("out"), py::arg("odtype"), py::arg("block_size"), py::arg("stream"),
        py::arg("divisor") = 1.0f);
  m.def("decompress_accumulate", &decompress_accumulate);
  m.def("reduce", &reduce);
  m.def("device_count", []() {
    int c = 0;
    return cudaGetDeviceCount(&c) == cudaSuccess ? c : 0;
  });
}
