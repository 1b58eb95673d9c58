// Peer relays: a load bound for one GPU also travels host -> peer GPU (the
// peer's own PCIe link) -> target (NVLink), see RelayConfig in engine.h.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <utility>

#include "target.h"

namespace sllm {

// Bytes one path has queued on its streams, bounded. A path claims its next
// block only once its oldest queued bytes have landed, so while several paths
// run each one's share of the load follows its measured rate (a block is
// 64 MiB; the tail is at most one block per path).
class InFlight {
 public:
  InFlight(Target& target, uint64_t limit) : target_(target), limit_(limit) {}
  ~InFlight();  // after the streams are synchronized
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

  // Waits for room, then `claim()`s a block (-1: none left, or `abort`); its bytes count as queued
  // from the claim on: blocks claimed but still being pinned fill the window too, so a copy's first
  // claims (one per registrar) cannot take every block before the relays start.
  int64_t claim(const std::function<int64_t()>& claim, const std::function<uint64_t(int64_t)>& bytes,
                const std::atomic<bool>& abort);
  // After a claimed block's copies are queued on `stream` (this thread's device).
  void queued(void* stream, uint64_t bytes);
  // A claimed block that goes another way (the stagers): its bytes leave the window.
  void dropped(uint64_t bytes);

 private:
  Target& target_;
  uint64_t limit_;
  uint64_t queued_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;  // a claimed block's events were recorded, or its bytes dropped
  std::deque<std::pair<void*, uint64_t>> events_;
};

}  // namespace sllm
