/* LD_PRELOAD shim for tests/test_loader.py: a file system that refuses O_DIRECT, as tmpfs and some overlay
 * file systems do. TIDAL_SHIM_REFUSE=open fails open(O_DIRECT) with EINVAL; =pread lets it open and fails
 * every pread on such a descriptor with EINVAL; =eio fails every pread of 64 KiB or more with EIO, on any
 * descriptor (a failing disk). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int direct_fds[1024];

static int refuse(const char* what) {
  const char* mode = getenv("TIDAL_SHIM_REFUSE");
  return mode != NULL && strcmp(mode, what) == 0;
}

static int shim_open(const char* sym, const char* path, int flags, mode_t mode) {
  int (*real)(const char*, int, ...) = (int (*)(const char*, int, ...))dlsym(RTLD_NEXT, sym);
  if ((flags & O_DIRECT) && refuse("open")) {
    errno = EINVAL;
    return -1;
  }
  int fd = real(path, flags, mode);
  if (fd >= 0 && fd < 1024) direct_fds[fd] = (flags & O_DIRECT) != 0;
  return fd;
}

static ssize_t shim_pread(const char* sym, int fd, void* buf, size_t n, off_t off) {
  ssize_t (*real)(int, void*, size_t, off_t) = (ssize_t (*)(int, void*, size_t, off_t))dlsym(RTLD_NEXT, sym);
  if (fd >= 0 && fd < 1024 && direct_fds[fd] && refuse("pread")) {
    errno = EINVAL;
    return -1;
  }
  if (n >= (64 << 10) && refuse("eio")) {
    errno = EIO;
    return -1;
  }
  return real(fd, buf, n, off);
}

#define MODE_ARG(flags, mode)                        \
  mode_t mode = 0;                                   \
  if (flags & O_CREAT) {                             \
    va_list ap;                                      \
    va_start(ap, flags);                             \
    mode = (mode_t)va_arg(ap, int);                  \
    va_end(ap);                                      \
  }

int open(const char* path, int flags, ...) {
  MODE_ARG(flags, mode)
  return shim_open("open", path, flags, mode);
}

int open64(const char* path, int flags, ...) {
  MODE_ARG(flags, mode)
  return shim_open("open64", path, flags, mode);
}

ssize_t pread(int fd, void* buf, size_t n, off_t off) { return shim_pread("pread", fd, buf, n, off); }
ssize_t pread64(int fd, void* buf, size_t n, off_t off) { return shim_pread("pread64", fd, buf, n, off); }
