// tidal._C: host-side native code. The Python shim in runtime/native.py validates every argument;
// this file only does the work, with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// Below this many bytes per thread, starting a thread costs more than the copy it would take over.
constexpr size_t kMinBytesPerThread = size_t(4) << 20;

// Copies byte range [begin, end) of the concatenation of all spans.
void copy_range(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                const std::vector<size_t>& sizes, size_t begin, size_t end) {
  size_t span_start = 0;
  for (size_t i = 0; i < sizes.size() && span_start < end; ++i) {
    size_t span_end = span_start + sizes[i];
    size_t lo = std::max(begin, span_start), hi = std::min(end, span_end);
    if (lo < hi) {
      size_t off = lo - span_start;
      std::memcpy(reinterpret_cast<char*>(dst[i]) + off, reinterpret_cast<const char*>(src[i]) + off, hi - lo);
    }
    span_start = span_end;
  }
}

// dst[i][0:sizes[i]] = src[i][0:sizes[i]] for every i, split evenly by bytes over up to max_threads threads.
size_t copy_spans(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                  const std::vector<size_t>& sizes, int max_threads) {
  if (dst.size() != src.size() || dst.size() != sizes.size())
    throw std::invalid_argument("copy_spans: dst, src and sizes differ in length");
  size_t total = 0;
  for (size_t n : sizes) total += n;
  py::gil_scoped_release release;
  size_t threads = std::max<size_t>(1, std::min<size_t>(max_threads, total / kMinBytesPerThread));
  if (threads == 1) {
    copy_range(dst, src, sizes, 0, total);
    return total;
  }
  std::vector<std::thread> pool;
  size_t chunk = (total + threads - 1) / threads;
  for (size_t t = 1; t < threads; ++t) {
    size_t begin = t * chunk, end = std::min(total, begin + chunk);
    pool.emplace_back(copy_range, std::cref(dst), std::cref(src), std::cref(sizes), begin, end);
  }
  copy_range(dst, src, sizes, 0, std::min(total, chunk));
  for (auto& th : pool) th.join();
  return total;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tidal host-side native code";
  m.def("copy_spans", &copy_spans, py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("max_threads"));
  m.def("hardware_threads", []() { return std::thread::hardware_concurrency(); });
  m.attr("ABI_VERSION") = 1;
}
