#include "bounce.h"

#include <sys/mman.h>

#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace tidal {
namespace {

constexpr uint64_t kHuge = uint64_t(2) << 20;
constexpr size_t kPoolMax = 8;  // buffers kept between calls (8 threads x 8 MiB chunks at the defaults)

std::mutex pool_mu;
std::vector<std::pair<char*, uint64_t>> pool;  // free buffers and their sizes

// A fresh mapping of `bytes` (a multiple of kHuge) aligned to kHuge, advised to use huge pages.
char* map_huge_aligned(uint64_t bytes) {
  void* p = ::mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  uintptr_t start = reinterpret_cast<uintptr_t>(p), aligned = (start + kHuge - 1) & ~(kHuge - 1);
  if (aligned > start) ::munmap(p, aligned - start);
  if (uintptr_t end = start + bytes + kHuge; end > aligned + bytes)
    ::munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
  ::madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // advice: fine if THP is off
  return reinterpret_cast<char*>(aligned);
}

}  // namespace

Bounce::Bounce(uint64_t bytes) : bytes_((bytes + kHuge - 1) & ~(kHuge - 1)), data_(nullptr) {
  {
    std::lock_guard<std::mutex> lock(pool_mu);
    for (size_t i = 0; i < pool.size(); ++i) {
      if (pool[i].second == bytes_) {
        data_ = pool[i].first;
        pool.erase(pool.begin() + long(i));
        return;
      }
    }
  }
  data_ = map_huge_aligned(bytes_);
}

Bounce::~Bounce() {
  std::lock_guard<std::mutex> lock(pool_mu);
  if (pool.size() < kPoolMax) {
    pool.emplace_back(data_, bytes_);
  } else {
    ::munmap(data_, bytes_);
  }
}

}  // namespace tidal
