// Turning (segment, offset, dst, nbytes) pieces into blocks the workers claim.
//
// A block is the work that lies in one chunk_bytes-aligned window of one
// segment (of a file source: file_block_bytes, when given): the unit of
// readiness waiting, registration and claiming. Pieces
// are split at window edges, so a big tensor becomes several blocks and many
// small tensors share one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sllm {

struct SegmentDesc {
  const uint8_t* base;
  uint64_t len;
  const uint8_t* ready;  // one byte per readiness chunk (0 pending, 1 ready, 2 failed); null = all ready
  uint64_t chunk;        // readiness chunk size in bytes
  // A file source instead of a mapping (base null, ready null): the stagers read the stored file `fd`
  // (through the page cache) into their pinned ring, each `window` bytes checked against digests[i]
  // (xxh3_64, the manifest's) as they land; a window that differs fails the copy.
  int fd = -1;
  const uint64_t* digests = nullptr;
  uint64_t window = 0;
  std::string name;  // what errors call it (the partition's file name); "" = "segment <index>"
  bool direct = false;  // fd was opened O_DIRECT: aligned reads straight into the slot (set from its flags)
  // Optional, with a file source: every byte read is also copied to tee + its offset (the memory tier's
  // segment of this file: one disk read fills both), and teed[w] = 1 once window w was copied whole and
  // matched its digest. Bytes there are nobody's until the caller publishes those windows.
  uint8_t* tee = nullptr;
  uint8_t* teed = nullptr;

  bool is_file() const { return fd >= 0; }
};

constexpr uint32_t kNoDestBlock = UINT32_MAX;

struct Unit {
  uint8_t* dst;  // an address, or an offset in destination block `dblk`
  uint64_t off;  // in its segment
  uint64_t n;
  uint32_t dblk = kNoDestBlock;  // an IPC destination block opened while the copy runs
};

struct Block {
  uint32_t seg;
  uint64_t lo, hi;  // byte range of the segment its units read
  uint64_t bytes;   // sum of unit sizes (pieces may overlap in the source)
  size_t u0, u1;    // units [u0, u1)
  uint64_t rc0, rc1;  // readiness chunks [rc0, rc1] it waits for
};

struct Plan {
  std::vector<Unit> units;
  std::vector<Block> blocks;
  uint64_t total = 0;
};

// pieces: n rows of (segment, src offset, dst address, nbytes). With `dest_blocks`
// (n entries), dst is an offset into that destination block instead of an
// address. Throws EngineError(BadPlan) naming the first bad piece.
Plan make_plan(const std::vector<SegmentDesc>& segs, const uint64_t* pieces, size_t n, uint64_t chunk_bytes,
               uint64_t file_block_bytes,
               const uint32_t* dest_blocks = nullptr);

}  // namespace sllm
