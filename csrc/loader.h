// tidal._C loader: reads byte ranges of files into caller-owned host memory with a pool of threads.
// The Python shim (runtime/native.py, read_spans) validates destinations; this code only does the I/O.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tidal {

// An I/O failure: the message names the file, the offset and the errno text. Surfaces in Python as
// tidal._C.ReadError, which runtime/native.py turns into tidal.errors.CheckpointError.
class ReadError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ReadSpan {
  size_t file;      // index into the files list
  uint64_t offset;  // first byte in the file
  uintptr_t dst;    // destination address, `size` writable bytes
  uint64_t size;
};

struct ReadOptions {
  int threads = 1;
  uint64_t chunk_bytes = uint64_t(8) << 20;  // a multiple of 4096: large spans split at these file offsets
  bool direct = true;                        // try O_DIRECT for the block-aligned middle of large spans
};

struct ReadReport {
  uint64_t bytes = 0;
  uint64_t direct_bytes = 0;    // O_DIRECT straight into the destination
  uint64_t bounce_bytes = 0;    // O_DIRECT into an aligned bounce buffer, then memcpy (destination misaligned)
  uint64_t buffered_bytes = 0;  // plain pread through the page cache (heads, tails, small spans, fallback)
  int threads = 0;
  std::vector<std::string> refused;  // "path: why" for each file where O_DIRECT was refused
};

// Reads every span; call without the GIL. Throws ReadError on a missing, unreadable or truncated file.
// On error some destinations may be partly written.
ReadReport read_spans(const std::vector<std::string>& files, const std::vector<ReadSpan>& spans,
                      const ReadOptions& options);

}  // namespace tidal
