// xxh3_64 from python xxhash's own library, found at run time, and the checksummed read built on it.
// Shared by the fill's hashed read (hashread.cpp) and the copy engine's file sources (engine.cpp):
// the same code and the same runtime choice of vector width as python xxhash, so the same digests
// as the manifests it wrote.
#pragma once

#include <cstdint>

namespace sllm {

// Finds xxh3 in the library at `path` (python xxhash's extension, already loaded). Once bound, for
// good: reads may be running on it. False if the library lacks the symbols (a build that hides them).
bool bind_xxh3(const char* path);
bool xxh3_bound();

// One running xxh3_64 (the library allocates the state: its layout is opaque here).
class Xxh3 {
 public:
  Xxh3();  // throws std::bad_alloc, or std::runtime_error before bind_xxh3
  ~Xxh3();
  Xxh3(const Xxh3&) = delete;
  Xxh3& operator=(const Xxh3&) = delete;
  void reset();
  void update(const void* p, uint64_t n);
  uint64_t digest() const;

 private:
  void* state_;
};

struct HashedRead {
  uint64_t done = 0;  // bytes that landed at the start of dst
  int err = 0;        // the errno that stopped it (0: none; a short read or a full buffer)
};

// preadv2 `step`-byte reads of [offset, offset + len) of `fd` into dst with `flags` (RWF_NOWAIT: only
// what the page cache holds), each read fed to `hash` while it is still in the CPU's caches. Stops at
// the first short read or error. Call without the GIL.
HashedRead read_hashed(int fd, uint8_t* dst, uint64_t len, uint64_t offset, uint64_t step, int flags, Xxh3& hash);

// What the page cache holds of [offset, offset + len) in `step` reads that do not wait (hashed in L2 as
// above), then the rest in one large read that waits for the disk (hashed after it: the disk bounds that
// part), as the fill reads a piece. Stops at an error or the file's end.
HashedRead read_cached_then_disk(int fd, uint8_t* dst, uint64_t len, uint64_t offset, uint64_t step, Xxh3& hash);

// O_DIRECT reads need their buffer, file offset and length aligned to the device's logical block.
constexpr uint64_t kDirectAlign = 4096;

// The size of each O_DIRECT read: fastsafetensors' no-GDS block, whose 16 threads read the H200s' virtual
// disks at 1.1-1.8x our 4-64 MiB requests (NOTES-cold runs 19-21); ours in this shape is run 22, unmeasured.
constexpr uint64_t kDirectStep = 512 << 10;

// [offset, offset + len) of `fd`, opened O_DIRECT, in kDirectStep reads past the page cache straight into
// dst, each hashed as it lands (still in L2). dst and offset must be kDirectAlign-aligned; the last read
// asks for len rounded up to it (the file's end stops it), so dst must have room for that. Stops at an
// error or the file's end. `overlap` (a multiple of kDirectAlign): every read but the last asks for that
// much more, the start of the next step, which lands where the next read puts the same bytes again
// (fastsafetensors' requests: 516 KiB at 512 KiB strides; NOTES-cold run 27).
HashedRead read_direct(int fd, uint8_t* dst, uint64_t len, uint64_t offset, Xxh3& hash, uint64_t overlap = 0);

// The request of a direct step of `left` bytes still to read: kDirectStep (+ overlap when more steps
// follow), or the rest rounded up to kDirectAlign.
inline uint64_t direct_request(uint64_t left, uint64_t overlap) {
  const auto whole = [](uint64_t n) { return (n + kDirectAlign - 1) / kDirectAlign * kDirectAlign; };
  if (left <= kDirectStep) return whole(left);
  const uint64_t next = whole(left - kDirectStep);  // dst has room for len rounded up: never past it
  return kDirectStep + (overlap < next ? overlap : next);
}

}  // namespace sllm
