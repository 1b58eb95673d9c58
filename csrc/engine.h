// The copy pipeline: readiness polling, block claiming, staging ring, in-place
// registration. Why each path exists, measured: bench/NOTES-copy-engine.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "direct_reads.h"
#include "plan.h"
#include "target.h"
#include "xxh3.h"

namespace sllm {

// register: pin each block of the mapping in place (cached), copy straight from it.
// stage:    native threads memcpy into a pinned ring, the ring feeds the copies.
// hybrid:   both at once: stagers take blocks from the front, registrars from the back.
enum class Mode { Register, Stage, Hybrid };

// Readiness bytes the cache writes, one per chunk of a segment. The definition is
// Python's sllmfs.protocol.messages.Readiness; these must equal it (the binding exposes
// them as _native.CHUNK_*, and tests/protocol/test_protocol_messages.py checks).
constexpr uint8_t kChunkPending = 0;
constexpr uint8_t kChunkReady = 1;
constexpr uint8_t kChunkFailed = 2;

struct EngineConfig {
  bool cuda = false;
  int device = 0;
  std::string cudart;  // path of the runtime torch loaded; empty = search
  std::string cudart_fallback;  // tried after the loader's search (a wheel's copy)
  Mode mode = Mode::Hybrid;
  int streams = 4;
  int stage_threads = 4;
  int register_threads = 1;
  uint64_t chunk_bytes = 64ull << 20;
  // a file source's block, a multiple of its checksum window (0: chunk_bytes). One window each (a front 64 MiB
  // wide, as fastsafetensors' threads read) was 0.91x the 64 MiB blocks on the H200 (NOTES-cold run 24)
  uint64_t file_block_bytes = 0;
  // O_DIRECT reads each stager keeps in flight on a file source (1: one at a time, read_direct; at most
  // kMaxReadDepth)
  int read_depth = 1;
  // bytes each O_DIRECT read but a range's last asks past its 512 KiB step (fastsafetensors asks 4 KiB: run 27;
  // a multiple of kDirectAlign, at most kMaxReadOverlap)
  uint64_t read_overlap = 0;
  uint64_t slot_bytes = 8ull << 20;
  int slots_per_thread = 3;
  double poll_seconds = 100e-6;
};

// Relays for one copy (issue 26): each idle peer GPU p with a peer link carries
// a share as host -> p (its own PCIe link) -> this GPU (NVLink), in slots of
// staging memory on p, both stages running at once. Sources must be pinned
// (register mode); peers without peer access are skipped with the reason.
struct RelayConfig {
  std::vector<int> peers;                // device ordinals that may relay
  uint64_t slot_bytes = 32ull << 20;     // staging memory on the peer = slots * slot_bytes
  int slots = 4;
  uint64_t direct_window = 256ull << 20;  // bytes the direct path may have queued (its share follows its rate)
};

struct RelayStats {
  int peer = -1;
  uint64_t bytes = 0;          // carried through this peer
  uint64_t staging_bytes = 0;  // device memory held on the peer while the copy ran
  double busy_seconds = 0;     // first byte sent to the peer until its last byte landed here
  std::string skipped;         // why it carried nothing or stopped early ("" = ran to the end)
};

struct CopyStats {
  uint64_t bytes = 0, staged_bytes = 0, registered_bytes = 0, newly_registered_bytes = 0;
  uint64_t blocks = 0, units = 0, register_calls = 0;
  double seconds = 0, register_seconds = 0, ring_alloc_seconds = 0, first_ready_seconds = 0;
  // when the last block's bytes were all ready; pinning's first start and last end (-1: no pin made);
  // the last block handed to a stream. All seconds since the copy started, as `seconds`.
  double last_ready_seconds = 0, pin_start_seconds = -1, pin_end_seconds = -1, last_queued_seconds = 0;
  // summed over the staging threads: filling slots (memcpy, or a file's read and checksum) and waiting
  // for a slot's last H2D before reusing it; with `seconds` they say whether the host or the link bound it
  double stage_fill_seconds = 0, stage_wait_seconds = 0;
  std::string register_fallback;  // why the register path stopped part way, if it did
  std::vector<RelayStats> relays;
};

class InFlight;

struct Registered {
  uint64_t bytes = 0;    // newly pinned by this call (0: cached, or pinned by someone else)
  double seconds = 0;
  bool cached = false;   // the range was already registered with this engine
};

// Destinations in other processes' GPU allocations (CUDA IPC handles). copy()
// opens them on a side thread in the order the plan first writes them, so the
// first bytes move after one open rather than after all of them (~50 us each).
struct IpcDests {
  std::vector<std::string> handles;  // 64 bytes each
  std::vector<std::string> buses;    // PCI bus id the client saw, one per handle
  std::vector<uintptr_t> opened;     // out: address of each handle opened (0: not opened)
  double open_seconds = 0;           // out: from the copy's start to the last open
};

// Called now and then from the copying thread; returning false aborts the copy.
using Tick = std::function<bool(uint64_t done, uint64_t total)>;

class Engine {
 public:
  explicit Engine(const EngineConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Blocks until every byte has landed (all streams synchronized) or throws
  // EngineError; on error too, nothing is left in flight.
  // `mode` overrides the configured one for this copy (threads stay as configured).
  // With `ipc`, piece i writes at offset dst into handle dest_blocks[i]; on
  // success the opened handles stay open (close_ipc each), on error none do.
  CopyStats copy(const std::vector<SegmentDesc>& segs, const uint64_t* pieces, size_t n, double timeout_s,
                 const Tick& tick, Mode mode, IpcDests* ipc = nullptr, const uint32_t* dest_blocks = nullptr,
                 const RelayConfig* relay = nullptr);
  // From any thread while a copy runs (or is about to): its relays finish the block
  // they hold and stop; the direct path takes the rest (another load wants a relaying GPU).
  void stop_relays() { relay_stop_ = true; }
  Mode mode() const { return cfg_.mode; }
  // Drops cached registrations inside [base, base+len): call before unmapping. Waits for a running
  // copy (it may read them) unless `idle`: for memory no copy can read (the sidecar's blanks, which
  // are not segments yet), so a shrink at reserve never waits behind another model's copy.
  size_t release(uintptr_t base, uint64_t len, bool idle = false);
  uint64_t registered_bytes();
  // Allocates every staging slot now (they otherwise come one at a time during the first copies:
  // ~90 ms of a 0.27 s load on the H200, NOTES-cold run 15). Returns the seconds it took.
  double prepare_ring();
  // Pins a whole segment now (off the load path) and caches it like the
  // blocks a copy pins; later copies from it go straight to the GPU.
  Registered register_segment(uintptr_t base, uint64_t len);
  // Opens another process's device allocation (CUDA IPC) on this engine's
  // device; `bus` is the PCI bus id the client saw. The address is an
  // ordinary destination for copy() until close_ipc.
  uintptr_t open_ipc(const void* handle, const std::string& bus);
  void close_ipc(uintptr_t addr);
  size_t open_ipc_count();
  std::string bus_id() { return target_->bus_id(); }
  void close();
  const char* target_name() const { return target_->name(); }

 private:
  struct Lane {
    std::vector<uint8_t*> slots;  // each kDirectAlign-aligned (O_DIRECT reads land in them), inside...
    std::vector<uint8_t*> allocs;  // ...what the target allocated, freed as such
    std::vector<void*> events;
    size_t cur = 0;
    // its stager's AIO context, made at its first O_DIRECT block when read_depth > 1 and kept with the
    // lane: io_destroy waits out an RCU grace period (~33 ms), too long to pay on every copy's path
    std::unique_ptr<DirectReads> reads;
    bool unqueued = false;  // the kernel refused it one (fs.aio-max-nr): read_direct instead
  };
  // One staging thread during one copy: its lane, its stream, how full its current slot is.
  struct Stager {
    Lane& lane;
    void* stream;
    uint64_t fill = 0;
    bool fresh = true;
    double alloc = 0;            // seconds spent growing the ring
    uint64_t fill_ns = 0, wait_ns = 0;  // filling slots, waiting on their last copies (CopyStats)
    std::unique_ptr<Xxh3> hash;  // made on its first file block
  };
  struct Job;
  struct RelayRun;

  void check_threads(Mode mode) const;
  void stage_worker(Job& job, int lane);
  void next_slot(Stager& st);
  void stage_block(Job& job, const Block& b, Stager& st);
  void stage_file_block(Job& job, const Block& b, Stager& st);
  void register_worker(Job& job, int index);
  void ipc_opener(Job& job, IpcDests& ipc);
  void relay_worker(Job& job, RelayRun& run);
  std::string peer_problem(int peer, Mode mode);
  void close_opened(IpcDests& ipc);
  void grow_lane(Lane& lane, double* seconds);
  std::pair<uintptr_t, uintptr_t> reg_range(const Job& job, const Block& b) const;
  bool is_registered(uintptr_t a, uintptr_t e);
  // Pins [a, e) through the process's Pins (shared with this process's other engines) and keeps one
  // reference per pin; returns the bytes pinned now, and the pins made now in *calls.
  uint64_t pin(uintptr_t a, uintptr_t e, uint64_t* calls = nullptr);
  // A copy out of pinned host memory: one copy per pin the source crosses (the driver refuses one
  // that spans two).
  void copy_pinned(uint8_t* dst, const uint8_t* src, uint64_t n, void* stream);

  EngineConfig cfg_;
  std::unique_ptr<Target> target_;
  std::vector<void*> streams_;
  std::vector<Lane> lanes_;
  std::mutex copy_mu_;
  std::mutex reg_mu_;
  std::map<uintptr_t, uintptr_t> regs_;  // start -> end of each pin (Pins) this engine holds a reference to
  std::mutex ipc_mu_;
  std::map<uintptr_t, int> ipc_;  // opened address -> times opened
  bool closed_ = false;
  std::atomic<bool> relay_stop_{false};
  std::vector<int> peers_enabled_;  // peer access enabled both ways (once per engine)
};

}  // namespace sllm
