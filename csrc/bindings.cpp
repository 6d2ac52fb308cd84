// bindings.cpp - pybind11 module ringreduce._C: the CPU kernels.
//
// The Python wrapper (ringreduce/kernels.py) validates formats, dtypes and
// sizes and gives friendly errors; the checks here only keep a bad call from
// touching memory it does not own.  Every kernel runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.h"
#include "quantize.h"

namespace py = pybind11;

namespace {

rr::CpuKernels g_kernels = rr::cpu_kernels_baseline();
std::string g_isa = "baseline";

bool cpu_has(const std::string& isa) {
  if (isa == "baseline") return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // Both builds also use F16C (every AVX2 CPU so far has it; checked anyway).
  const bool f16c = __builtin_cpu_supports("f16c");
  if (isa == "avx2") return f16c && __builtin_cpu_supports("avx2");
  if (isa == "avx512")
    return f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

// Selects the kernels built for `isa` ("baseline", "avx2", "avx512" or "auto").
std::string set_isa(const std::string& isa) {
  std::string pick = isa;
  if (isa == "auto") pick = cpu_has("avx512") ? "avx512" : (cpu_has("avx2") ? "avx2" : "baseline");
  if (pick != "baseline" && pick != "avx2" && pick != "avx512")
    throw std::invalid_argument("unknown instruction set '" + isa + "'");
  if (!cpu_has(pick)) throw std::invalid_argument("this CPU does not support " + pick);
  g_kernels = pick == "avx512" ? rr::cpu_kernels_avx512()
              : pick == "avx2" ? rr::cpu_kernels_avx2() : rr::cpu_kernels_baseline();
  g_isa = pick;
  return g_isa;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* s : {"baseline", "avx2", "avx512"})
    if (cpu_has(s)) out.push_back(s);
  return out;
}

struct Buf {
  void* ptr;
  int64_t nbytes;
};

// Contiguous view of a buffer-protocol object; `what` names it in errors.
Buf get_buf(const py::buffer& obj, bool writable, const char* what) {
  py::buffer_info info = obj.request(writable);
  int64_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect)
      throw std::invalid_argument(std::string(what) + " must be C-contiguous");
    expect *= info.shape[d];
  }
  return Buf{info.ptr, (int64_t)(info.size * info.itemsize)};
}

void need(int64_t have, int64_t want, const char* what) {
  if (have < want)
    throw std::invalid_argument(std::string(what) + " is too small: " + std::to_string(have) +
                                " bytes, need " + std::to_string(want));
}

int64_t dtype_size(int dt) {
  switch (dt) {
    case rr::DT_F32: case rr::DT_I32: return 4;
    case rr::DT_F16: case rr::DT_BF16: return 2;
    case rr::DT_F64: case rr::DT_I64: return 8;
    case rr::DT_I8: case rr::DT_U8: return 1;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(dt));
}

void check_fmt(int fmt, int64_t block_size) {
  if (fmt < rr::FMT_FP16 || fmt > rr::FMT_ONEBIT)
    throw std::invalid_argument("unknown format code " + std::to_string(fmt));
  if (block_size <= 0 || block_size % 8 != 0)
    throw std::invalid_argument("block_size must be a positive multiple of 8");
}

int64_t compress(int fmt, py::buffer x, int xdtype, int64_t n, py::buffer out,
                 py::object residual, int64_t block_size, bool has_clip, float clip,
                 bool stochastic, uint64_t seed, uint64_t counter, uint64_t offset,
                 float divisor, py::object values, int vdtype) {
  check_fmt(fmt, block_size);
  if (xdtype != rr::DT_F32 && xdtype != rr::DT_F16 && xdtype != rr::DT_BF16)
    throw std::invalid_argument("x must be float32, float16 or bfloat16");
  Buf bx = get_buf(x, false, "x");
  Buf bo = get_buf(out, true, "out");
  need(bx.nbytes, n * dtype_size(xdtype), "x");
  need(bo.nbytes, rr::packed_nbytes(fmt, n, block_size), "out");
  float* res = nullptr;
  if (!residual.is_none()) {
    Buf br = get_buf(residual.cast<py::buffer>(), true, "residual");
    need(br.nbytes, 4 * n, "residual");
    res = static_cast<float*>(br.ptr);
  }
  void* vals = nullptr;
  if (!values.is_none()) {
    if (vdtype != rr::DT_F32 && vdtype != rr::DT_F16 && vdtype != rr::DT_BF16)
      throw std::invalid_argument("values must be float32, float16 or bfloat16");
    Buf bv = get_buf(values.cast<py::buffer>(), true, "values");
    need(bv.nbytes, n * dtype_size(vdtype), "values");
    vals = bv.ptr;
  }
  rr::CompressArgs a{fmt, bx.ptr, xdtype, n, static_cast<uint8_t*>(bo.ptr), res, block_size,
                     has_clip, clip, stochastic, seed, counter, offset, divisor, vals, vdtype};
  int64_t bad;
  {
    py::gil_scoped_release nogil;
    bad = g_kernels.compress(a);
  }
  if (bad < 0) throw std::bad_alloc();
  return bad;
}

void decompress(int fmt, py::buffer packed, int64_t n, py::buffer out, int odtype,
                int64_t block_size, float divisor) {
  check_fmt(fmt, block_size);
  if (odtype != rr::DT_F32 && odtype != rr::DT_F16 && odtype != rr::DT_BF16)
    throw std::invalid_argument("out must be float32, float16 or bfloat16");
  Buf bp = get_buf(packed, false, "packed");
  Buf bo = get_buf(out, true, "out");
  need(bp.nbytes, rr::packed_nbytes(fmt, n, block_size), "packed");
  need(bo.nbytes, n * dtype_size(odtype), "out");
  py::gil_scoped_release nogil;
  g_kernels.decompress(fmt, static_cast<const uint8_t*>(bp.ptr), n, bo.ptr, odtype, block_size,
                       divisor);
}

void decompress_accumulate(int fmt, py::buffer packed, int64_t n, py::buffer acc, float alpha,
                           int64_t block_size) {
  check_fmt(fmt, block_size);
  Buf bp = get_buf(packed, false, "packed");
  Buf ba = get_buf(acc, true, "acc");
  need(bp.nbytes, rr::packed_nbytes(fmt, n, block_size), "packed");
  need(ba.nbytes, 4 * n, "acc");
  py::gil_scoped_release nogil;
  g_kernels.decompress_accumulate(fmt, static_cast<const uint8_t*>(bp.ptr), n,
                                static_cast<float*>(ba.ptr), alpha, block_size);
}

void reduce(int op, int dtype, py::buffer dst, py::buffer src, int64_t n) {
  if (op < rr::OP_SUM || op > rr::OP_MAX) throw std::invalid_argument("unknown op code");
  int64_t es = dtype_size(dtype);
  Buf bd = get_buf(dst, true, "dst");
  Buf bs = get_buf(src, false, "src");
  need(bd.nbytes, n * es, "dst");
  need(bs.nbytes, n * es, "src");
  py::gil_scoped_release nogil;
  g_kernels.reduce(op, dtype, bd.ptr, bs.ptr, n);
}

// ---- the tiny-allreduce fast path (ringreduce/collectives.py) ---------------
// A tiny allreduce is one allgather of fixed-width rows: the call's fingerprint
// (kHeaderFields int64) then the payload.  These two calls do the per-call work
// around that allgather in one step each, because at a few bytes the Python
// object work (views, slices, ufunc dispatch) costs several times the MPI call.
constexpr int64_t kHeaderFields = 9;
constexpr int64_t kHeaderBytes = kHeaderFields * 8;

// The handshake of a shared-memory barrier (transport.window): each rank counts
// its calls in its own int64 flag, `stride` bytes apart from `flags`, and a call
// is complete once every flag has reached e.  With `publish`, this rank's
// earlier stores are fenced before its flag says e (what MPI_Win_sync then a
// store does).  Polls up to `polls` times (at least once); on success fences
// again so the peers' rows are read after their flags.  False: not yet (the
// caller enters its supervised wait and calls again with publish=false).
// Takes the address as an integer: a numpy argument costs more than the poll.
bool flags_arrive(uintptr_t flags, int64_t stride, int64_t nranks, int64_t rank, int64_t e,
                  int64_t polls, bool publish) {
  auto* base = reinterpret_cast<uint8_t*>(flags);
  auto flag = [&](int64_t j) { return reinterpret_cast<int64_t*>(base + j * stride); };
  if (publish) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(flag(rank), e, __ATOMIC_RELEASE);
  }
  for (int64_t i = 0; i < std::max<int64_t>(polls, 1); ++i) {
    bool all = true;
    for (int64_t j = 0; j < nranks && all; ++j)
      all = j == rank || __atomic_load_n(flag(j), __ATOMIC_ACQUIRE) >= e;
    if (all) {
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      return true;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  return false;
}

// Writes [seq, kind, count, dtype, op, algorithm, name, shape, 0] and the first
// bytes of x (as many as the row holds) into the send row, the rest into `tail`.
void small_pack(py::array send, py::array x, int64_t seq, int64_t dtype_code, int64_t op,
                int64_t algorithm_hash, int64_t name_hash, int64_t shape_hash, py::object tail) {
  if (!(x.flags() & py::array::c_style)) throw std::invalid_argument("x must be C-contiguous");
  need(send.nbytes(), kHeaderBytes, "send");
  int64_t nbytes = std::min<int64_t>(x.nbytes(), send.nbytes() - kHeaderBytes);
  int64_t rest = x.nbytes() - nbytes;
  if (rest) {   // the bytes that do not fit the row go to `tail`, for the second allgather
    if (tail.is_none()) throw std::invalid_argument("x does not fit the row and no tail was given");
    auto t = tail.cast<py::array>();
    need(t.nbytes(), rest, "tail");
    memcpy(t.mutable_data(), static_cast<const uint8_t*>(x.data()) + nbytes, rest);
  }
  int64_t h[kHeaderFields] = {seq, 1, (int64_t)x.size(), dtype_code, op, algorithm_hash,
                              name_hash, shape_hash, 0};
  auto* dst = static_cast<uint8_t*>(send.mutable_data());
  memcpy(dst, h, sizeof h);
  if (nbytes) memcpy(dst + kHeaderBytes, x.data(), nbytes);
}

// Whether every rank's header row equals row 0.
bool small_same(py::array recv, int64_t width, int64_t nranks) {
  need(width, kHeaderBytes, "row width");
  need(recv.nbytes(), nranks * width, "recv");
  const auto* rows = static_cast<const uint8_t*>(recv.data());
  for (int64_t r = 1; r < nranks; ++r)
    if (memcmp(rows, rows + r * width, kHeaderBytes) != 0) return false;
  return true;
}

// Average: x / n in the dtype, as numpy's divide does it (half types via fp32).
void divide_by(void* p, int dtype, int64_t n, int64_t count) {
  switch (dtype) {
    case rr::DT_F32: { auto* d = static_cast<float*>(p); float k = (float)count;
      for (int64_t i = 0; i < n; ++i) d[i] = d[i] / k; break; }
    case rr::DT_F64: { auto* d = static_cast<double*>(p); double k = (double)count;
      for (int64_t i = 0; i < n; ++i) d[i] = d[i] / k; break; }
    case rr::DT_F16: { auto* d = static_cast<uint16_t*>(p); float k = rr::f16_to_f32(rr::f32_to_f16((float)count));
      for (int64_t i = 0; i < n; ++i) d[i] = rr::f32_to_f16(rr::f16_to_f32(d[i]) / k); break; }
    case rr::DT_BF16: { auto* d = static_cast<uint16_t*>(p); float k = rr::bf16_to_f32(rr::f32_to_bf16((float)count));
      for (int64_t i = 0; i < n; ++i) d[i] = rr::f32_to_bf16(rr::bf16_to_f32(d[i]) / k); break; }
    default: throw std::invalid_argument("Average needs a float dtype");
  }
}

// out = op over the ranks' payloads in rank order (/ n for Average).  Each
// rank's payload is the rest of its row, followed by its slice of `rest` (the
// bytes that did not fit, gathered by a second allgather) when there is one.
void small_reduce(py::array recv, int64_t width, int64_t nranks, py::array out, int dtype, int op,
                  bool average, py::object rest) {
  if (op < rr::OP_SUM || op > rr::OP_MAX) throw std::invalid_argument("unknown op code");
  if (!(out.flags() & py::array::c_style) || !out.writeable())
    throw std::invalid_argument("out must be C-contiguous and writable");
  int64_t es = dtype_size(dtype), nbytes = out.nbytes();
  int64_t head = std::min<int64_t>(nbytes, width - kHeaderBytes);
  int64_t tail = nbytes - head;
  if (head % es) throw std::invalid_argument("row payload is not a whole number of elements");
  need(recv.nbytes(), nranks * width, "recv");
  const uint8_t* more = nullptr;
  if (tail) {
    if (rest.is_none()) throw std::invalid_argument("payload does not fit the row and no rest was given");
    auto r = rest.cast<py::array>();
    if (!(r.flags() & py::array::c_style)) throw std::invalid_argument("rest must be C-contiguous");
    need(r.nbytes(), nranks * tail, "rest");
    more = static_cast<const uint8_t*>(r.data());
  }
  const auto* rows = static_cast<const uint8_t*>(recv.data());
  auto* d = static_cast<uint8_t*>(out.mutable_data());
  memcpy(d, rows + kHeaderBytes, head);
  if (tail) memcpy(d + head, more, tail);
  for (int64_t r = 1; r < nranks; ++r) {
    g_kernels.reduce(op, dtype, d, rows + r * width + kHeaderBytes, head / es);
    if (tail) g_kernels.reduce(op, dtype, d + head, more + r * tail, tail / es);
  }
  if (average && nranks > 1) divide_by(d, dtype, nbytes / es, nranks);
}

// The fast path's agreement over rows in shared memory, in one call: the call's
// fingerprint (`header`: kHeaderFields int64, its call number replaced by seq)
// into the send row, the handshake (flags_arrive), then the compare of every
// rank's header row in `recv`.  0: every rank agreed; 1: the peers are not
// there yet (published: the caller waits, then compares); 2: they disagree.
int header_exchange(py::array send, py::array header, int64_t seq, uintptr_t flags, int64_t stride,
                    int64_t nranks, int64_t rank, int64_t e, int64_t polls, py::array recv,
                    int64_t width) {
  need(send.nbytes(), kHeaderBytes, "send");
  need(header.nbytes(), kHeaderBytes, "header");
  auto* dst = static_cast<uint8_t*>(send.mutable_data());
  memcpy(dst, header.data(), kHeaderBytes);
  memcpy(dst, &seq, sizeof seq);
  if (!flags_arrive(flags, stride, nranks, rank, e, polls, true)) return 1;
  return small_same(recv, width, nranks) ? 0 : 2;
}

// The tiny path over rows in shared memory: the compare and the reduction, which
// writes out only when every header matched (False: a mismatch, out untouched,
// so an in-place x keeps its values) ...
bool small_finish(py::array recv, int64_t width, int64_t nranks, py::array out, int dtype, int op,
                  bool average) {
  if (!small_same(recv, width, nranks)) return false;
  small_reduce(recv, width, nranks, out, dtype, op, average, py::none());
  return true;
}

// ... and the whole call in one: small_pack, the handshake (flags_arrive), then
// small_finish.  0: done; 1: the peers are not there yet (published: the caller
// waits, then calls small_finish); 2: the headers differ (out untouched).
int small_allreduce(py::array send, py::array x, int64_t seq, int64_t dtype_code, int64_t op,
                    int64_t algorithm_hash, int64_t name_hash, int64_t shape_hash,
                    uintptr_t flags, int64_t stride, int64_t nranks, int64_t rank, int64_t e,
                    int64_t polls, py::array recv, int64_t width, py::array out, int dtype,
                    int kernel_op, bool average) {
  if (x.nbytes() + kHeaderBytes > send.nbytes()) throw std::invalid_argument("x does not fit the row");
  small_pack(send, x, seq, dtype_code, op, algorithm_hash, name_hash, shape_hash, py::none());
  if (!flags_arrive(flags, stride, nranks, rank, e, polls, true)) return 1;
  return small_finish(recv, width, nranks, out, dtype, kernel_op, average) ? 0 : 2;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ringreduce CPU kernels (see ringreduce.kernels for the documented API)";
  // RINGREDUCE_CPU_ISA pins one build (the tests compare them); default: the best.
  const char* env = getenv("RINGREDUCE_CPU_ISA");
  set_isa(env && *env ? env : "auto");
  m.def("compress", &compress, py::arg("fmt"), py::arg("x"), py::arg("xdtype"), py::arg("n"),
        py::arg("out"), py::arg("residual"), py::arg("block_size"), py::arg("has_clip"),
        py::arg("clip"), py::arg("stochastic"), py::arg("seed"), py::arg("counter"),
        py::arg("offset"), py::arg("divisor") = 1.0f, py::arg("values") = py::none(),
        py::arg("vdtype") = 0);
  m.def("decompress", &decompress, py::arg("fmt"), py::arg("packed"), py::arg("n"),
        py::arg("out"), py::arg("odtype"), py::arg("block_size"), py::arg("divisor") = 1.0f);
  m.def("set_isa", &set_isa, "Select the kernels for 'baseline', 'avx2', 'avx512' or 'auto'");
  m.def("isa", []() { return g_isa; });
  m.def("supported_isas", &supported_isas);
  m.def("decompress_accumulate", &decompress_accumulate);
  m.def("reduce", &reduce);
  m.def("small_pack", &small_pack);
  m.def("small_same", &small_same);
  m.def("flags_arrive", &flags_arrive);
  m.def("small_allreduce", &small_allreduce);
  m.def("header_exchange", &header_exchange);
  m.def("small_finish", &small_finish);
  m.def("small_reduce", &small_reduce);
  m.def("packed_nbytes", [](int fmt, int64_t n, int64_t block_size) {
    check_fmt(fmt, block_size);
    return rr::packed_nbytes(fmt, n, block_size);
  });
}
