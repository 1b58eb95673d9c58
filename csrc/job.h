// One copy() call: the plan, the queues workers claim from, and the outcome.
// Shared by the pipeline (engine.cpp) and the peer relays (relay.cpp).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine.h"
#include "errors.h"
#include "relay.h"

namespace sllm {

// Who asks for the next block: stagers take from the front of the ready queue,
// registrars from the back (hybrid mode meets where their speeds put them);
// relays take pinned blocks first, then the front.
enum class Claimer { Stager, Registrar, Relay };

struct Engine::Job {
  const std::vector<SegmentDesc>& segs;
  const Plan& plan;
  int stage_threads;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<uint32_t> queue;   // ready blocks, in the order they became ready
  std::deque<uint32_t> pinned;  // ready blocks whose range is already registered
  bool all_dispatched = false;
  int workers_left = 0;
  int registrars_left = 0;
  std::atomic<bool> abort{false};
  std::atomic<uint64_t> done{0}, staged{0}, registered{0}, newly_registered{0}, register_calls{0};
  std::atomic<uint64_t> register_ns{0}, stage_fill_ns{0}, stage_wait_ns{0};
  // The copy's timeline (ns since it started): when pinning first began and last ended, when the last
  // block was handed to a stream; with first/last_ready_seconds they say what bound a streaming copy
  // (the fill, the pins or the link). Written by the workers, read once they have joined.
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  std::atomic<uint64_t> pin_first_ns{UINT64_MAX}, pin_last_ns{0}, queued_last_ns{0};
  double ring_alloc_seconds = 0;  // max over stagers: they allocate in parallel
  std::string fallback;
  std::unique_ptr<EngineError> error;
  std::unique_ptr<std::atomic<uintptr_t>[]> dest;  // IPC destination block -> address (0 until opened)
  std::vector<uint32_t> open_order;                // blocks in the order the plan first writes them
  // cudaHostRegister and cudaIpcOpenMemHandle contend in the driver: 227 opens took 0.73-1.0 s beside
  // 8 pinning threads on the H200 against 13-20 ms alone (bench/NOTES-cold.md), so pinning waits for them
  std::atomic<bool> opens_done{true};
  std::unique_ptr<InFlight> direct;                // bounds the direct path's queued bytes while relays run

  Job(const std::vector<SegmentDesc>& s, const Plan& p, int st) : segs(s), plan(p), stage_threads(st) {}

  // Where a unit's bytes go: its address, or its offset in an IPC block once
  // the opener has it (the opener runs ahead: one open is ~50 us, a block's copy ~1 ms).
  uint8_t* dst(const Unit& u) {
    if (u.dblk == kNoDestBlock) return u.dst;
    uintptr_t a;
    while ((a = dest[u.dblk].load(std::memory_order_acquire)) == 0) {
      if (abort) throw EngineError(ErrorKind::Aborted, "copy aborted");
      std::this_thread::sleep_for(std::chrono::microseconds(10));
    }
    return reinterpret_cast<uint8_t*>(a + reinterpret_cast<uintptr_t>(u.dst));
  }

  uint64_t now_ns() const {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  }
  static void keep_min(std::atomic<uint64_t>& a, uint64_t v) {
    for (uint64_t cur = a.load(); v < cur && !a.compare_exchange_weak(cur, v);) {
    }
  }
  static void keep_max(std::atomic<uint64_t>& a, uint64_t v) {
    for (uint64_t cur = a.load(); v > cur && !a.compare_exchange_weak(cur, v);) {
    }
  }

  void fail(const EngineError& e) {
    std::lock_guard<std::mutex> lk(mu);
    if (!error) error = std::make_unique<EngineError>(e);
    abort = true;
    cv.notify_all();
  }

  // Next block for a worker, or -1 when there is no more work.
  int64_t claim(Claimer who) {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      if (abort) return -1;
      if (!pinned.empty() && (who != Claimer::Stager || registrars_left == 0)) {
        uint32_t id = pinned.front();
        pinned.pop_front();
        return id;
      }
      if (!queue.empty()) {
        uint32_t id;
        if (who == Claimer::Registrar) {
          id = queue.back();
          queue.pop_back();
        } else {
          id = queue.front();
          queue.pop_front();
        }
        return id;
      }
      if (all_dispatched && pinned.empty()) return -1;
      cv.wait(lk);
    }
  }

  void worker_exit(bool registrar) {
    std::lock_guard<std::mutex> lk(mu);
    --workers_left;
    if (registrar) --registrars_left;
    cv.notify_all();
  }
};

// One peer during one copy: slots of staging memory on the peer, each with its
// own stream there, so slot i's hop to the target overlaps slot i+1's upload.
struct Engine::RelayRun {
  int peer;
  uint64_t slot_bytes;
  int nslots;
  uint8_t* staging = nullptr;  // nslots * slot_bytes on the peer
  std::vector<void*> streams, events;
  std::vector<bool> used;
  RelayStats stats;
  RelayRun(int p, const RelayConfig& cfg) : peer(p), slot_bytes(cfg.slot_bytes), nslots(cfg.slots) { stats.peer = p; }
};


}  // namespace sllm
