// tidal._C: host-side native code. The Python shim in runtime/native.py validates every argument;
// this file only does the work, with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

#include "loader.h"

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

// spans: (file index, file offset, destination address, bytes). Returns the loader's report as a dict.
py::dict read_spans(const std::vector<std::string>& files,
                    const std::vector<std::tuple<size_t, uint64_t, uintptr_t, uint64_t>>& spans, int threads,
                    uint64_t chunk_bytes, bool direct) {
  std::vector<tidal::ReadSpan> work;
  work.reserve(spans.size());
  for (const auto& [file, offset, dst, size] : spans) {
    if (file >= files.size()) throw std::out_of_range("read_spans: span names file " + std::to_string(file));
    work.push_back({file, offset, dst, size});
  }
  tidal::ReadReport r;
  {
    py::gil_scoped_release release;
    r = tidal::read_spans(files, work, {threads, chunk_bytes, direct});
  }
  py::dict out;
  out["bytes"] = r.bytes;
  out["direct_bytes"] = r.direct_bytes;
  out["bounce_bytes"] = r.bounce_bytes;
  out["buffered_bytes"] = r.buffered_bytes;
  out["threads"] = r.threads;
  out["refused"] = r.refused;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tidal host-side native code";
  m.def("copy_spans", &copy_spans, py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("max_threads"));
  m.def("read_spans", &read_spans, py::arg("files"), py::arg("spans"), py::arg("threads"),
        py::arg("chunk_bytes"), py::arg("direct"));
  py::register_exception<tidal::ReadError>(m, "ReadError", PyExc_OSError);
  m.def("hardware_threads", []() { return std::thread::hardware_concurrency(); });
  m.attr("ABI_VERSION") = 2;
}
