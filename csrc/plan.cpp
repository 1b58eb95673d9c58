#include "plan.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace sllm {
namespace {

struct Keyed {
  uint32_t seg;
  uint64_t window;
  Unit u;
};

[[noreturn]] void bad(size_t i, const std::string& why) {
  throw EngineError(ErrorKind::BadPlan, "piece " + std::to_string(i) + ": " + why);
}

}  // namespace

Plan make_plan(const std::vector<SegmentDesc>& segs, const uint64_t* pieces, size_t n, uint64_t chunk_bytes,
               uint64_t file_block_bytes, const uint32_t* dest_blocks) {
  for (size_t s = 0; s < segs.size(); ++s) {
    const SegmentDesc& sd = segs[s];
    const std::string name = "segment " + std::to_string(s);
    if (sd.ready && sd.chunk == 0) throw EngineError(ErrorKind::BadPlan, name + ": readiness given with chunk size 0");
    // a file's checksum windows never straddle two blocks: a stager reads and checks whole windows
    if (sd.is_file() && (sd.ready || !sd.digests || sd.window == 0 ||
                         (file_block_bytes ? file_block_bytes : chunk_bytes) % sd.window != 0))
      throw EngineError(ErrorKind::BadPlan, name + ": a file source needs digests, no readiness, and a checksum "
                                                   "window that divides the file block size");
  }
  std::vector<Keyed> keyed;
  keyed.reserve(n);
  Plan plan;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t* p = pieces + 4 * i;
    uint64_t s = p[0], off = p[1], dst = p[2], nb = p[3];
    if (nb == 0) continue;
    if (s >= segs.size()) bad(i, "segment " + std::to_string(s) + " does not exist (" + std::to_string(segs.size()) + " given)");
    const SegmentDesc& sd = segs[s];
    if (off > sd.len || nb > sd.len - off)
      bad(i, "bytes [" + std::to_string(off) + ", +" + std::to_string(nb) + ") lie outside segment " + std::to_string(s) +
                 " of " + std::to_string(sd.len) + " bytes");
    uint32_t dblk = dest_blocks ? dest_blocks[i] : kNoDestBlock;
    if ((dst == 0 && !dest_blocks) || dst + nb < dst) bad(i, "bad destination address");
    plan.total += nb;
    // Split at window edges so no unit straddles two blocks (a file's: file_block_bytes, 0 = chunk_bytes).
    const uint64_t span = sd.is_file() && file_block_bytes ? file_block_bytes : chunk_bytes;
    uint64_t done = 0;
    while (done < nb) {
      uint64_t o = off + done;
      uint64_t w = o / span;
      uint64_t k = std::min(nb - done, (w + 1) * span - o);
      keyed.push_back({static_cast<uint32_t>(s), w, Unit{reinterpret_cast<uint8_t*>(dst + done), o, k, dblk}});
      done += k;
    }
  }
  std::stable_sort(keyed.begin(), keyed.end(), [](const Keyed& a, const Keyed& b) {
    return a.seg != b.seg ? a.seg < b.seg : a.u.off < b.u.off;
  });
  plan.units.reserve(keyed.size());
  for (size_t i = 0; i < keyed.size(); ++i) {
    const Keyed& k = keyed[i];
    if (i == 0 || k.seg != keyed[i - 1].seg || k.window != keyed[i - 1].window) {
      plan.blocks.push_back(Block{k.seg, k.u.off, k.u.off + k.u.n, 0, i, i, 0, 0});
    }
    Block& b = plan.blocks.back();
    b.hi = std::max(b.hi, k.u.off + k.u.n);
    b.bytes += k.u.n;
    b.u1 = i + 1;
    plan.units.push_back(k.u);
  }
  for (Block& b : plan.blocks) {
    const SegmentDesc& sd = segs[b.seg];
    if (sd.ready) {
      b.rc0 = b.lo / sd.chunk;
      b.rc1 = (b.hi - 1) / sd.chunk;
    }
  }
  return plan;
}

}  // namespace sllm
