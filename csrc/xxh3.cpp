#include "xxh3.h"

#include <dlfcn.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <new>
#include <stdexcept>

namespace sllm {
namespace {

using CreateState = void* (*)();
using FreeState = int (*)(void*);
using Reset = int (*)(void*);
using Update = int (*)(void*, const void*, size_t);
using Digest = uint64_t (*)(const void*);

struct Api {
  CreateState create = nullptr;
  FreeState free = nullptr;
  Reset reset = nullptr;
  Update update = nullptr;
  Digest digest = nullptr;
};

Api g_api;  // written once by bind_xxh3 (under the GIL), read by every hashing thread after

template <typename F>
F symbol(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

}  // namespace

bool bind_xxh3(const char* path) {
  if (g_api.update != nullptr) return true;
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);  // loaded already: this only takes a reference
  if (lib == nullptr) return false;
  Api a;
  a.create = symbol<CreateState>(lib, "XXH3_createState");
  a.free = symbol<FreeState>(lib, "XXH3_freeState");
  a.reset = symbol<Reset>(lib, "XXH3_64bits_reset");
  // xxhash's x86 dispatcher: the widest vectors this CPU has (the plain one is the build's baseline)
  a.update = symbol<Update>(lib, "XXH3_64bits_update_dispatch");
  if (a.update == nullptr) a.update = symbol<Update>(lib, "XXH3_64bits_update");
  a.digest = symbol<Digest>(lib, "XXH3_64bits_digest");
  if (!a.create || !a.free || !a.reset || !a.update || !a.digest) {
    dlclose(lib);
    return false;
  }
  g_api = a;  // the library stays open for the life of the process
  return true;
}

bool xxh3_bound() { return g_api.update != nullptr; }

Xxh3::Xxh3() {
  if (!xxh3_bound()) throw std::runtime_error("xxh3 is not bound (bind_xxh3 first)");
  state_ = g_api.create();
  if (state_ == nullptr) throw std::bad_alloc();
  g_api.reset(state_);
}

Xxh3::~Xxh3() { g_api.free(state_); }
void Xxh3::reset() { g_api.reset(state_); }
void Xxh3::update(const void* p, uint64_t n) { g_api.update(state_, p, n); }
uint64_t Xxh3::digest() const { return g_api.digest(state_); }

HashedRead read_hashed(int fd, uint8_t* dst, uint64_t len, uint64_t offset, uint64_t step, int flags, Xxh3& hash) {
  HashedRead r;
  while (r.done < len) {
    const uint64_t want = step < len - r.done ? step : len - r.done;
    struct iovec iov = {dst + r.done, static_cast<size_t>(want)};
    const ssize_t got = preadv2(fd, &iov, 1, static_cast<off_t>(offset + r.done), flags);
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      break;
    }
    hash.update(dst + r.done, static_cast<uint64_t>(got));  // still in L2: the read just wrote it
    r.done += static_cast<uint64_t>(got);
    if (static_cast<uint64_t>(got) < want) break;  // the page cache ran out, or the file did
  }
  return r;
}

HashedRead read_cached_then_disk(int fd, uint8_t* dst, uint64_t len, uint64_t offset, uint64_t step, Xxh3& hash) {
  // EAGAIN: the next page is not cached; EOPNOTSUPP: no such reads here; a short read: the cache ran out
  HashedRead r = read_hashed(fd, dst, len, offset, step, RWF_NOWAIT, hash);
  if (r.err != 0 && r.err != EAGAIN && r.err != EOPNOTSUPP) return r;
  r.err = 0;
  const uint64_t from = r.done;
  while (r.done < len) {
    const ssize_t got = pread(fd, dst + r.done, static_cast<size_t>(len - r.done), static_cast<off_t>(offset + r.done));
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      break;
    }
    if (got == 0) break;  // the file's end
    r.done += static_cast<uint64_t>(got);
  }
  hash.update(dst + from, r.done - from);
  return r;
}

HashedRead read_direct(int fd, uint8_t* dst, uint64_t len, uint64_t offset, Xxh3& hash, uint64_t overlap) {
  HashedRead r;
  while (r.done < len) {
    const uint64_t left = len - r.done;
    const uint64_t want = direct_request(left, overlap);
    const ssize_t got = pread(fd, dst + r.done, static_cast<size_t>(want), static_cast<off_t>(offset + r.done));
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      break;
    }
    if (got == 0) break;  // the file's end
    const uint64_t step = left < kDirectStep ? left : kDirectStep;  // what this read is for (not its overlap)
    const uint64_t kept = static_cast<uint64_t>(got) < step ? static_cast<uint64_t>(got) : step;
    hash.update(dst + r.done, kept);
    r.done += kept;
    if (static_cast<uint64_t>(got) % kDirectAlign != 0) break;  // an unaligned short read: the file's end
  }
  return r;
}

}  // namespace sllm
