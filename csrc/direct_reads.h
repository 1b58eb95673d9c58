// Several O_DIRECT reads of one range in flight at once, each hashed in file order as it lands.
#pragma once

#include <linux/aio_abi.h>

#include <cstdint>
#include <vector>

#include "xxh3.h"

namespace sllm {

// The bounds of a read depth and overlap (EngineConfig's, the fill's; the module exports them: the CLI checks
// with these)
constexpr int kMaxReadDepth = 64;
constexpr uint64_t kMaxReadOverlap = 1ull << 20;

// Linux AIO: a read of a file opened O_DIRECT is queued to the disk and io_submit returns at once, so a
// stager's next request waits at the disk while it hashes the last (io_uring would do the same; this
// needs no library). One per stager thread; depth 1 is read_direct's synchronous loop.
class DirectReads {
 public:
  explicit DirectReads(int depth, uint64_t overlap = 0);
  ~DirectReads();
  DirectReads(const DirectReads&) = delete;
  DirectReads& operator=(const DirectReads&) = delete;

  // read_direct's contract (aligned dst and offset, room for len rounded up to kDirectAlign), with up to
  // `depth` kDirectStep reads in flight. Returns only once none is in flight (dst may be reused at once).
  HashedRead read(int fd, uint8_t* dst, uint64_t len, uint64_t offset, Xxh3& hash);

 private:
  void drain();  // waits for every read still in flight

  aio_context_t ctx_ = 0;
  int depth_;
  uint64_t overlap_;  // read_direct's: each read but the last asks this much of the next step too
  int in_flight_ = 0;
  std::vector<iocb> cbs_;         // one per step of the current read
  std::vector<io_event> events_;
  std::vector<int64_t> results_;  // per step of the current read: bytes, -errno, or kPending
};

}  // namespace sllm
