// Bounce buffers for O_DIRECT reads whose destination is not block-aligned (see loader.cpp).
#pragma once

#include <cstdint>

namespace tidal {

// A block-aligned buffer of `bytes`, backed by transparent huge pages where the kernel allows: physically
// contiguous memory lets one direct read go to the device as a few large segments (with scattered 4 KiB
// pages a virtio disk split 8 MiB reads into 512 KiB requests and ran at a third of the speed). Buffers
// go back to a small process-wide pool, so repeated loads do not map and fault them again. Thread-safe.
class Bounce {
 public:
  explicit Bounce(uint64_t bytes);
  ~Bounce();
  Bounce(const Bounce&) = delete;
  Bounce& operator=(const Bounce&) = delete;

  char* data() const { return data_; }
  uint64_t size() const { return bytes_; }

 private:
  uint64_t bytes_;
  char* data_;
};

}  // namespace tidal
