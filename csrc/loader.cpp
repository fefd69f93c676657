// The loader behind tidal._C.read_spans: see loader.h.
//
// Each span is cut at multiples of chunk_bytes in file-offset space, so a few large tensors still spread
// over all threads, and every interior piece starts and ends on a block boundary. A piece's block-aligned
// middle is read with O_DIRECT: straight into the destination when the destination address is congruent to
// the file offset modulo the block size, otherwise into a per-thread bounce buffer (bounce.h) and copied. The
// unaligned head and tail, small spans, and files that refuse O_DIRECT go through a plain buffered fd.
#include "loader.h"

#include "bounce.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

namespace tidal {
namespace {

constexpr uint64_t kBlock = 4096;               // covers the logical block size of common devices
constexpr uint64_t kMinDirect = uint64_t(256) << 10;  // smaller spans: one buffered read beats direct I/O

uint64_t align_down(uint64_t x) { return x & ~(kBlock - 1); }
uint64_t align_up(uint64_t x) { return align_down(x + kBlock - 1); }

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

// One opened file: a buffered fd always, an O_DIRECT fd while the file system accepts it.
struct File {
  std::string path;
  int fd = -1;
  int dfd = -1;
  uint64_t size = 0;
  std::atomic<bool> direct{false};
  std::mutex mu;
  std::string refused;  // why O_DIRECT is off for this file, when it was asked for and refused

  File(const std::string& p, bool want_direct) : path(p) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer. It changes nothing for a regular file.
    fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw ReadError(path + ": cannot open: " + errno_text(errno));
    struct stat st;
    std::string why;
    if (::fstat(fd, &st) != 0)
      why = "cannot stat: " + errno_text(errno);
    else if (!S_ISREG(st.st_mode))
      why = "not a regular file";
    if (!why.empty()) {
      ::close(fd);
      throw ReadError(path + ": " + why);
    }
    size = uint64_t(st.st_size);
    if (!want_direct) return;
    dfd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_DIRECT);
    if (dfd < 0)
      refused = "open(O_DIRECT) failed: " + errno_text(errno);
    else
      direct = true;
  }
  ~File() {
    if (fd >= 0) ::close(fd);
    if (dfd >= 0) ::close(dfd);
  }
  void refuse(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu);
    if (direct.exchange(false)) refused = why;
  }
};

struct Piece {
  File* file;
  uint64_t offset;
  char* dst;
  uint64_t size;
  bool direct;  // the span is large enough for O_DIRECT
};

struct Counters {
  uint64_t direct = 0, bounce = 0, buffered = 0;
};

// Exactly n bytes at `off` through the buffered fd, or a ReadError. Loops over short reads and EINTR.
void pread_full(const File& f, char* dst, uint64_t n, uint64_t off) {
  while (n > 0) {
    ssize_t got = ::pread(f.fd, dst, size_t(std::min<uint64_t>(n, uint64_t(1) << 30)), off_t(off));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0)
      throw ReadError(f.path + ": read of " + std::to_string(n) + " bytes at offset " + std::to_string(off) +
                      " failed: " + errno_text(errno));
    if (got == 0)
      throw ReadError(f.path + ": unexpected end of file at offset " + std::to_string(off) + " (" +
                      std::to_string(n) + " bytes still to read; truncated while reading?)");
    dst += got;
    n -= uint64_t(got);
    off += uint64_t(got);
  }
}

// Up to n bytes (a block multiple) at the block-aligned `off` with O_DIRECT into the block-aligned dst.
// Returns the bytes read, always a block multiple; stops early when the file system refuses direct I/O
// (the file is then marked buffered) or a read comes back short, and the caller reads the rest buffered.
uint64_t pread_direct(File& f, char* dst, uint64_t n, uint64_t off) {
  uint64_t done = 0;
  while (done < n && f.direct.load(std::memory_order_relaxed)) {
    ssize_t got = ::pread(f.dfd, dst + done, size_t(n - done), off_t(off + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && errno == EINVAL) {
      f.refuse("pread(O_DIRECT) failed: " + errno_text(EINVAL));
      break;
    }
    if (got < 0)
      throw ReadError(f.path + ": direct read of " + std::to_string(n - done) + " bytes at offset " +
                      std::to_string(off + done) + " failed: " + errno_text(errno));
    done += align_down(uint64_t(got));
    if (uint64_t(got) % kBlock != 0 || got == 0) break;  // short: leave the rest to the buffered fd
  }
  return done;
}

class Worker {
 public:
  explicit Worker(uint64_t bounce_bytes) : bounce_bytes_(bounce_bytes) {}
  Counters counters;

  void read(const Piece& p) {
    File& f = *p.file;
    uint64_t end = p.offset + p.size, a = align_up(p.offset), b = align_down(end);
    if (!p.direct || !f.direct.load(std::memory_order_relaxed) || a >= b) {
      buffered(f, p.dst, p.size, p.offset);
      return;
    }
    buffered(f, p.dst, a - p.offset, p.offset);                 // unaligned head
    buffered(f, p.dst + (b - p.offset), end - b, b);            // unaligned tail
    char* mid = p.dst + (a - p.offset);
    uint64_t done = reinterpret_cast<uintptr_t>(mid) % kBlock == 0 ? straight(f, mid, b - a, a)
                                                                    : bounced(f, mid, b - a, a);
    buffered(f, mid + done, b - a - done, a + done);            // whatever direct I/O left over
  }

 private:
  uint64_t bounce_bytes_;
  std::unique_ptr<Bounce> bounce_;  // taken on the first misaligned piece, back to the pool at the end

  void buffered(const File& f, char* dst, uint64_t n, uint64_t off) {
    pread_full(f, dst, n, off);
    counters.buffered += n;
  }
  uint64_t straight(File& f, char* dst, uint64_t n, uint64_t off) {
    uint64_t done = pread_direct(f, dst, n, off);
    counters.direct += done;
    return done;
  }
  uint64_t bounced(File& f, char* dst, uint64_t n, uint64_t off) {
    if (!bounce_) bounce_ = std::make_unique<Bounce>(bounce_bytes_);
    uint64_t done = 0;
    while (done < n) {
      uint64_t want = std::min(n - done, bounce_bytes_);
      uint64_t got = pread_direct(f, bounce_->data(), want, off + done);
      std::memcpy(dst + done, bounce_->data(), got);
      done += got;
      if (got < want) break;
    }
    counters.bounce += done;
    return done;
  }
};

std::vector<Piece> cut(const std::vector<std::unique_ptr<File>>& files, const std::vector<ReadSpan>& spans,
                       uint64_t chunk) {
  std::vector<Piece> pieces;
  for (const ReadSpan& s : spans) {
    File* f = files.at(s.file).get();
    if (s.offset > f->size || s.size > f->size - s.offset)
      throw ReadError(f->path + ": truncated: " + std::to_string(s.size) + " bytes at offset " +
                      std::to_string(s.offset) + " end past the file's " + std::to_string(f->size) + " bytes");
    bool direct = s.size >= kMinDirect;
    char* dst = reinterpret_cast<char*>(s.dst);
    for (uint64_t pos = s.offset, end = s.offset + s.size; pos < end;) {
      uint64_t next = std::min(end, (pos / chunk + 1) * chunk);
      pieces.push_back({f, pos, dst + (pos - s.offset), next - pos, direct});
      pos = next;
    }
  }
  // File order, so that the threads walk each file front to back together.
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& x, const Piece& y) {
    return x.file != y.file ? x.file < y.file : x.offset < y.offset;
  });
  return pieces;
}

}  // namespace

ReadReport read_spans(const std::vector<std::string>& paths, const std::vector<ReadSpan>& spans,
                      const ReadOptions& options) {
  if (options.threads < 1) throw std::invalid_argument("read_spans: threads must be >= 1");
  if (options.chunk_bytes < kBlock || options.chunk_bytes % kBlock != 0)
    throw std::invalid_argument("read_spans: chunk_bytes must be a positive multiple of 4096");
  std::vector<std::unique_ptr<File>> files;
  for (const std::string& p : paths) files.push_back(std::make_unique<File>(p, options.direct));
  std::vector<Piece> pieces = cut(files, spans, options.chunk_bytes);

  ReadReport report;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::exception_ptr error;
  auto work = [&]() {
    Worker w(options.chunk_bytes);
    try {
      for (size_t i; !failed.load() && (i = next.fetch_add(1)) < pieces.size();) w.read(pieces[i]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
      failed = true;
    }
    std::lock_guard<std::mutex> lock(mu);
    report.direct_bytes += w.counters.direct;
    report.bounce_bytes += w.counters.bounce;
    report.buffered_bytes += w.counters.buffered;
  };
  size_t want = std::max<size_t>(1, std::min<size_t>(size_t(options.threads), pieces.size()));
  std::vector<std::thread> pool;
  try {
    while (pool.size() + 1 < want) pool.emplace_back(work);
  } catch (const std::system_error&) {  // no more threads to be had: the ones started share the work
  }
  report.threads = int(pool.size() + 1);
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);

  report.bytes = report.direct_bytes + report.bounce_bytes + report.buffered_bytes;
  for (const auto& f : files)
    if (options.direct && !f->direct) report.refused.push_back(f->path + ": " + f->refused);
  return report;
}

}  // namespace tidal
