#include "engine.h"


#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <thread>

#include "errors.h"
#include "job.h"
#include "pins.h"
#include "relay.h"
#include "xxh3.h"

namespace sllm {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

constexpr uintptr_t kPage = 4096;
constexpr uintptr_t kHuge = 2u << 20;

uintptr_t down(uintptr_t x, uintptr_t a) { return x / a * a; }
uintptr_t up(uintptr_t x, uintptr_t a) { return (x + a - 1) / a * a; }

std::string segment_name(const SegmentDesc& sd, uint32_t index) {
  return sd.name.empty() ? "segment " + std::to_string(index) : sd.name;
}

std::string range_text(uint64_t off, uint64_t n) {
  return "bytes " + std::to_string(off) + "..+" + std::to_string(n);
}

}  // namespace

Engine::Engine(const EngineConfig& cfg) : cfg_(cfg) {
  if (cfg_.chunk_bytes == 0 || cfg_.chunk_bytes % kHuge != 0)
    throw EngineError(ErrorKind::BadPlan, "chunk_bytes must be a positive multiple of 2 MiB");
  if (cfg_.slot_bytes == 0 || cfg_.slots_per_thread < 2)
    throw EngineError(ErrorKind::BadPlan, "the staging ring needs slot_bytes > 0 and at least 2 slots per thread");
  if (cfg_.streams < 1) throw EngineError(ErrorKind::BadPlan, "streams must be at least 1");
  check_threads(cfg_.mode);
  target_ = cfg_.cuda ? make_cuda_target(cfg_.device, cfg_.cudart, cfg_.cudart_fallback) : make_host_target();
  for (int i = 0; i < cfg_.streams; ++i) streams_.push_back(target_->create_stream());
  lanes_.resize(std::max(cfg_.stage_threads, 0));  // rings are allocated on first use
}

void Engine::check_threads(Mode mode) const {
  if (mode != Mode::Register && cfg_.stage_threads < 1)
    throw EngineError(ErrorKind::BadPlan, "stage and hybrid modes need at least one staging thread");
  if (mode != Mode::Stage && cfg_.register_threads < 1)
    throw EngineError(ErrorKind::BadPlan, "register and hybrid modes need at least one registering thread");
}

Engine::~Engine() {
  try {
    close();
  } catch (...) {
  }
}

void Engine::close() {
  std::lock_guard<std::mutex> lk(copy_mu_);
  if (closed_) return;
  closed_ = true;
  target_->bind_thread();
  for (void* s : streams_) {
    try {
      target_->sync(s);
    } catch (...) {
    }
  }
  {
    std::lock_guard<std::mutex> rl(reg_mu_);
    for (auto& [a, e] : regs_) Pins::of(*target_).release(*target_, a);
    regs_.clear();
  }
  {
    std::lock_guard<std::mutex> il(ipc_mu_);
    for (auto& [a, n] : ipc_)
      for (int i = 0; i < n; ++i) {
        try {
          target_->ipc_close(reinterpret_cast<void*>(a));
        } catch (...) {
        }
      }
    ipc_.clear();
  }
  for (Lane& l : lanes_) {
    for (void* e : l.events) target_->destroy_event(e);
    for (uint8_t* a : l.allocs) target_->free_pinned(a);
  }
  lanes_.clear();
  for (void* s : streams_) target_->destroy_stream(s);
  streams_.clear();
}

size_t Engine::release(uintptr_t base, uint64_t len, bool idle) {
  std::unique_lock<std::mutex> lk(copy_mu_, std::defer_lock);
  if (!idle) lk.lock();  // never while a copy reads from it
  std::lock_guard<std::mutex> rl(reg_mu_);
  size_t n = 0;
  for (auto it = regs_.lower_bound(down(base, kPage)); it != regs_.end() && it->first < base + len;) {
    Pins::of(*target_).release(*target_, it->first);  // unpins when no other engine holds it
    it = regs_.erase(it);
    ++n;
  }
  return n;
}

uint64_t Engine::registered_bytes() {
  std::lock_guard<std::mutex> rl(reg_mu_);
  uint64_t n = 0;
  for (auto& [a, e] : regs_) n += e - a;
  return n;
}

double Engine::prepare_ring() {
  std::lock_guard<std::mutex> lk(copy_mu_);  // the lanes are the copies' (one at a time)
  if (closed_) throw EngineError(ErrorKind::Runtime, "the copy engine is closed");
  target_->bind_thread();
  double seconds = 0;
  for (Lane& lane : lanes_)
    while (lane.slots.size() < static_cast<size_t>(cfg_.slots_per_thread)) grow_lane(lane, &seconds);
  return seconds;
}

Registered Engine::register_segment(uintptr_t base, uint64_t len) {
  Registered r;
  if (len == 0) return r;
  if (closed_) throw EngineError(ErrorKind::Runtime, "the copy engine is closed");
  auto t = Clock::now();
  uintptr_t a = down(base, kPage), e = up(base + len, kPage);
  if (is_registered(a, e)) {
    r.cached = true;
    return r;
  }
  bool overlap;
  {
    std::lock_guard<std::mutex> rl(reg_mu_);
    auto it = regs_.lower_bound(a);
    overlap = it != regs_.end() && it->first < e;
  }
  // Blocks an earlier copy pinned one by one: unpin them, pin the whole once (around the pins
  // another engine of this process still holds).
  if (overlap) release(a, e - a);
  target_->bind_thread();
  r.bytes = pin(a, e);
  r.seconds = since(t);
  return r;
}

uint64_t Engine::pin(uintptr_t a, uintptr_t e, uint64_t* calls) {
  std::vector<Pins::Ticket> got = Pins::of(*target_).cover(*target_, a, e);
  std::vector<uintptr_t> extra;  // pins this engine already held (one reference per engine)
  uint64_t now = 0;
  {
    std::lock_guard<std::mutex> rl(reg_mu_);
    for (const Pins::Ticket& tk : got) {
      if (tk.pinned_now) now += tk.end - tk.start;
      if (!regs_.emplace(tk.start, tk.end).second) extra.push_back(tk.start);
    }
  }
  for (uintptr_t x : extra) Pins::of(*target_).release(*target_, x);
  if (calls) {
    for (const Pins::Ticket& tk : got) *calls += tk.pinned_now;
  }
  return now;
}

void Engine::copy_pinned(uint8_t* dst, const uint8_t* src, uint64_t n, void* stream) {
  const auto s0 = reinterpret_cast<uintptr_t>(src);
  for (uintptr_t s = s0, end = s0 + n; s < end;) {
    uintptr_t stop = end;
    {
      std::lock_guard<std::mutex> rl(reg_mu_);
      auto it = regs_.upper_bound(s);
      if (it != regs_.begin() && std::prev(it)->second > s) stop = std::min(end, std::prev(it)->second);
    }
    target_->copy(dst + (s - s0), reinterpret_cast<const void*>(s), stop - s, stream);
    s = stop;
  }
}

uintptr_t Engine::open_ipc(const void* handle, const std::string& bus) {
  if (closed_) throw EngineError(ErrorKind::Runtime, "the copy engine is closed");
  target_->bind_thread();
  int dev = target_->device_of_bus(bus);
  if (dev != cfg_.device)
    throw EngineError(ErrorKind::Cuda, "the allocation is on GPU " + bus + " (device " + std::to_string(dev) +
                                           " here) but this engine copies to device " + std::to_string(cfg_.device) +
                                           "; use one engine per GPU");
  auto a = reinterpret_cast<uintptr_t>(target_->ipc_open(handle));
  std::lock_guard<std::mutex> il(ipc_mu_);
  ++ipc_[a];
  return a;
}

void Engine::close_ipc(uintptr_t addr) {
  {
    std::lock_guard<std::mutex> il(ipc_mu_);
    auto it = ipc_.find(addr);
    if (it == ipc_.end())
      throw EngineError(ErrorKind::Runtime, "address " + std::to_string(addr) + " was not opened by open_ipc");
    if (--it->second == 0) ipc_.erase(it);
  }
  target_->bind_thread();
  target_->ipc_close(reinterpret_cast<void*>(addr));
}

size_t Engine::open_ipc_count() {
  std::lock_guard<std::mutex> il(ipc_mu_);
  size_t n = 0;
  for (auto& [a, k] : ipc_) n += k;
  return n;
}

bool Engine::is_registered(uintptr_t a, uintptr_t e) {
  // Every page of [a, e) in pins this engine holds (pins are disjoint; several may cover it back to back).
  std::lock_guard<std::mutex> rl(reg_mu_);
  auto it = regs_.upper_bound(a);
  if (it == regs_.begin()) return false;
  --it;
  for (uintptr_t at = a; it != regs_.end() && it->first <= at; ++it) {
    at = std::max(at, it->second);
    if (at >= e) return true;
  }
  return false;
}

// The page range a block pins: its bytes widened to 2 MiB (huge pages pin
// whole) but never past its window or the mapping, so blocks never overlap.
std::pair<uintptr_t, uintptr_t> Engine::reg_range(const Job& job, const Block& b) const {
  const SegmentDesc& sd = job.segs[b.seg];
  uint64_t win = b.lo / cfg_.chunk_bytes * cfg_.chunk_bytes;
  uint64_t lo = std::max<uint64_t>(down(b.lo, kHuge), win);
  uint64_t hi = std::min<uint64_t>({up(b.hi, kHuge), win + cfg_.chunk_bytes, up(sd.len, kPage)});
  auto base = reinterpret_cast<uintptr_t>(sd.base);
  return {down(base + lo, kPage), up(base + hi, kPage)};
}

// Adds one slot to a lane's ring. Slots come one at a time as the ring fills,
// so a fresh engine starts copying after one small cudaHostAlloc, not all of them.
void Engine::grow_lane(Lane& lane, double* seconds) {
  auto t = Clock::now();
  // one page more than a slot: whatever alignment the runtime gives, the slot starts on a page
  auto* a = static_cast<uint8_t*>(target_->alloc_pinned(cfg_.slot_bytes + kDirectAlign));
  lane.allocs.push_back(a);
  const auto at = reinterpret_cast<uintptr_t>(a);
  lane.slots.push_back(a + ((kDirectAlign - at % kDirectAlign) % kDirectAlign));
  lane.events.push_back(target_->create_event());
  *seconds += since(t);
}

void Engine::stage_worker(Job& job, int lane_id) {
  try {
    target_->bind_thread();
    Stager st{lanes_[lane_id], streams_[lane_id % streams_.size()]};
    int64_t id;
    while ((id = job.claim(Claimer::Stager)) >= 0) {
      if (st.lane.slots.empty()) {
        grow_lane(st.lane, &st.alloc);
        st.lane.cur = 0;
      } else if (st.fresh) {
        // First block of this copy: a fresh slot (the last copy synchronized every stream).
        st.lane.cur = (st.lane.cur + 1) % st.lane.slots.size();
      }
      st.fresh = false;
      const Block& b = job.plan.blocks[id];
      if (job.segs[b.seg].is_file())
        stage_file_block(job, b, st);
      else
        stage_block(job, b, st);
      job.staged += b.bytes;
      Job::keep_max(job.queued_last_ns, job.now_ns());
      job.done += b.bytes;
    }
    job.stage_fill_ns += st.fill_ns;
    job.stage_wait_ns += st.wait_ns;
    std::lock_guard<std::mutex> lk(job.mu);
    job.ring_alloc_seconds = std::max(job.ring_alloc_seconds, st.alloc);
  } catch (const EngineError& e) {
    job.fail(e);
  } catch (const std::exception& e) {
    job.fail(EngineError(ErrorKind::Runtime, e.what()));
  }
  job.worker_exit(false);
}

// Hands the current slot to the GPU and moves to the next; reuses the oldest once its copies are done.
void Engine::next_slot(Stager& st) {
  target_->record(st.lane.events[st.lane.cur], st.stream);
  st.lane.cur = (st.lane.cur + 1) % static_cast<size_t>(cfg_.slots_per_thread);
  if (st.lane.cur == st.lane.slots.size()) {
    grow_lane(st.lane, &st.alloc);
  } else {
    auto t = Clock::now();
    target_->wait(st.lane.events[st.lane.cur]);
    st.wait_ns += static_cast<uint64_t>(since(t) * 1e9);
  }
  st.fill = 0;
}

void Engine::stage_block(Job& job, const Block& b, Stager& st) {
  const uint8_t* base = job.segs[b.seg].base;
  for (size_t u = b.u0; u < b.u1 && !job.abort; ++u) {
    const Unit& unit = job.plan.units[u];
    uint64_t off = 0;
    while (off < unit.n) {
      if (st.fill == cfg_.slot_bytes) next_slot(st);
      uint64_t k = std::min(unit.n - off, cfg_.slot_bytes - st.fill);
      uint8_t* slot = st.lane.slots[st.lane.cur] + st.fill;
      auto t = Clock::now();
      std::memcpy(slot, base + unit.off + off, k);
      st.fill_ns += static_cast<uint64_t>(since(t) * 1e9);
      target_->copy(job.dst(unit) + off, slot, k, st.stream);
      st.fill += k;
      off += k;
    }
  }
}

// A block of a file source: each checksum window its units touch is read from the file into the ring
// (what the page cache holds in kFileStep reads hashed as they land, the rest in one read from the disk),
// and its units' bytes go to the GPU from there. A window that
// fits in a slot is checked before any of its bytes move on; a larger one (slots smaller than the
// window) at its last read, failing the copy as a failed chunk does.
void Engine::stage_file_block(Job& job, const Block& b, Stager& st) {
  constexpr uint64_t kFileStep = 256 << 10;  // the fill's read size: each read is hashed while in L2
  const SegmentDesc& sd = job.segs[b.seg];
  if (!st.hash) st.hash = std::make_unique<Xxh3>();
  Lane& lane = st.lane;
  if (sd.direct && cfg_.read_depth > 1 && !lane.reads && !lane.unqueued) {
    try {
      lane.reads = std::make_unique<DirectReads>(cfg_.read_depth, cfg_.read_overlap);
    } catch (const std::exception&) {
      lane.unqueued = true;  // no AIO context to be had (fs.aio-max-nr reached): one read at a time, as depth 1
    }
  }
  const Unit* units = job.plan.units.data();
  for (uint64_t w = b.lo / sd.window; w * sd.window < b.hi && !job.abort; ++w) {
    const uint64_t wlo = w * sd.window, whi = std::min(wlo + sd.window, sd.len);
    bool used = false;
    for (size_t u = b.u0; u < b.u1 && !used; ++u) used = units[u].off < whi && units[u].off + units[u].n > wlo;
    if (!used) continue;
    if (sd.direct) {  // an O_DIRECT read lands at an aligned place in the slot (the window's start is aligned)
      st.fill = std::min(cfg_.slot_bytes, (st.fill + kDirectAlign - 1) / kDirectAlign * kDirectAlign);
    }
    if (st.fill + (whi - wlo) > cfg_.slot_bytes && whi - wlo <= cfg_.slot_bytes) next_slot(st);
    st.hash->reset();
    for (uint64_t at = wlo; at < whi;) {
      if (st.fill == cfg_.slot_bytes) next_slot(st);
      const uint64_t k = std::min(whi - at, cfg_.slot_bytes - st.fill);
      uint8_t* slot = st.lane.slots[st.lane.cur] + st.fill;
      auto t = Clock::now();
      HashedRead r = !sd.direct ? read_cached_then_disk(sd.fd, slot, k, at, kFileStep, *st.hash)
                     : lane.reads ? lane.reads->read(sd.fd, slot, k, at, *st.hash)
                                : read_direct(sd.fd, slot, k, at, *st.hash, cfg_.read_overlap);
      st.fill_ns += static_cast<uint64_t>(since(t) * 1e9);
      if (r.err != 0 || r.done != k)
        throw EngineError(ErrorKind::Io, "reading " + segment_name(sd, b.seg) + " (" + range_text(at, k) + "): " +
                                             (r.err ? std::strerror(r.err) : "the file ends early"));
      if (at + k == whi && st.hash->digest() != sd.digests[w])
        throw EngineError(ErrorKind::Corrupt, segment_name(sd, b.seg) + ": checksum window " + std::to_string(w) +
                                                  " (" + range_text(wlo, whi - wlo) +
                                                  ") differs from its manifest digest");
      for (size_t u = b.u0; u < b.u1; ++u) {  // the units' bytes in [at, at + k), in file order
        const Unit& unit = units[u];
        if (unit.off >= at + k) break;
        const uint64_t x0 = std::max(unit.off, at), x1 = std::min(unit.off + unit.n, at + k);
        if (x0 < x1) target_->copy(job.dst(unit) + (x0 - unit.off), slot + (x0 - at), x1 - x0, st.stream);
      }
      // the tier's copy, once the GPU's is queued (the slot stays until next_slot waits on its event); the
      // caller publishes a window only once it is flagged here, whole and verified
      if (sd.tee) std::memcpy(sd.tee + at, slot, k);
      if (sd.teed && at + k == whi) sd.teed[w] = 1;
      st.fill += k;
      at += k;
    }
  }
}

void Engine::register_worker(Job& job, int index) {
  try {
    target_->bind_thread();
    size_t turn = index;
    int64_t id;
    auto next = [&]() -> int64_t {
      if (!job.direct) return job.claim(Claimer::Registrar);
      return job.direct->claim([&] { return job.claim(Claimer::Registrar); },
                               [&](int64_t b) { return job.plan.blocks[b].bytes; }, job.abort);
    };
    while ((id = next()) >= 0) {
      const Block& b = job.plan.blocks[id];
      auto [a, e] = reg_range(job, b);
      if (!is_registered(a, e)) {
        while (!job.opens_done.load(std::memory_order_acquire) && !job.abort)
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        auto t = Clock::now();
        Job::keep_min(job.pin_first_ns, job.now_ns());
        uint64_t now, calls = 0;
        try {
          now = pin(a, e, &calls);
        } catch (const EngineError& err) {
          if (job.stage_threads == 0) throw;
          // Pinning refused (limits, odd mapping): leave this and the rest to the stagers.
          if (job.direct) job.direct->dropped(b.bytes);
          std::lock_guard<std::mutex> lk(job.mu);
          job.queue.push_front(static_cast<uint32_t>(id));
          if (job.fallback.empty()) job.fallback = err.what();
          job.cv.notify_all();
          break;
        }
        job.register_ns += static_cast<uint64_t>(since(t) * 1e9);
        Job::keep_max(job.pin_last_ns, job.now_ns());
        job.newly_registered += now;
        job.register_calls += calls;
      }
      void* stream = streams_[turn++ % streams_.size()];
      const uint8_t* base = job.segs[b.seg].base;
      for (size_t u = b.u0; u < b.u1; ++u) {
        const Unit& unit = job.plan.units[u];
        copy_pinned(job.dst(unit), base + unit.off, unit.n, stream);
      }
      if (job.direct) job.direct->queued(stream, b.bytes);
      Job::keep_max(job.queued_last_ns, job.now_ns());
      job.registered += b.bytes;
      job.done += b.bytes;
    }
  } catch (const EngineError& e) {
    job.fail(e);
  } catch (const std::exception& e) {
    job.fail(EngineError(ErrorKind::Runtime, e.what()));
  }
  job.worker_exit(true);
}

void Engine::ipc_opener(Job& job, IpcDests& ipc) {
  auto t = Clock::now();
  try {
    for (uint32_t b : job.open_order) {
      if (job.abort) break;
      uintptr_t a = open_ipc(ipc.handles[b].data(), ipc.buses[b]);
      ipc.opened[b] = a;
      job.dest[b].store(a, std::memory_order_release);
    }
  } catch (const EngineError& e) {
    job.fail(e);
  } catch (const std::exception& e) {
    job.fail(EngineError(ErrorKind::Runtime, e.what()));
  }
  ipc.open_seconds = since(t);
  job.opens_done.store(true, std::memory_order_release);
}

// After a failed copy: no handle stays open (the first close error loses to the copy's).
void Engine::close_opened(IpcDests& ipc) {
  for (uintptr_t& a : ipc.opened) {
    if (!a) continue;
    try {
      close_ipc(a);
    } catch (const EngineError&) {
    }
    a = 0;
  }
}

CopyStats Engine::copy(const std::vector<SegmentDesc>& segs, const uint64_t* pieces, size_t n, double timeout_s,
                       const Tick& tick, Mode mode, IpcDests* ipc, const uint32_t* dest_blocks,
                       const RelayConfig* relay) {
  std::lock_guard<std::mutex> guard(copy_mu_);
  check_threads(mode);
  if (closed_) throw EngineError(ErrorKind::Runtime, "the copy engine is closed");
  if (ipc) {
    if (!dest_blocks || ipc->buses.size() != ipc->handles.size())
      throw EngineError(ErrorKind::BadPlan, "IPC destinations need a block per piece and a bus per handle");
    for (size_t i = 0; i < n; ++i)
      if (dest_blocks[i] >= ipc->handles.size())
        throw EngineError(ErrorKind::BadPlan, "piece " + std::to_string(i) + " names destination block " +
                                                  std::to_string(dest_blocks[i]) + " of " +
                                                  std::to_string(ipc->handles.size()));
    ipc->opened.assign(ipc->handles.size(), 0);
  }
  for (const SegmentDesc& sd : segs) {
    if (!sd.is_file()) continue;
    if (mode != Mode::Stage)  // nothing to pin in place: only the stagers read files
      throw EngineError(ErrorKind::BadPlan, "file sources are read by the staging threads: copy them in stage mode");
    if (!xxh3_bound()) throw EngineError(ErrorKind::BadPlan, "file sources are checksummed: bind_xxh3() first");
    if (relay && !relay->peers.empty())  // relays read pinned memory; a file has none
      throw EngineError(ErrorKind::BadPlan, "file sources cannot be relayed: copy them without relay peers");
    if (sd.direct && (cfg_.slot_bytes % kDirectAlign != 0 || sd.window % kDirectAlign != 0))
      throw EngineError(ErrorKind::BadPlan, "an O_DIRECT file source needs slots and checksum windows in multiples of " +
                                                std::to_string(kDirectAlign) + " bytes");
  }
  auto t0 = Clock::now();
  Plan plan = make_plan(segs, pieces, n, cfg_.chunk_bytes, cfg_.file_block_bytes, ipc ? dest_blocks : nullptr);
  target_->bind_thread();
  // The framework may still be writing the target tensors on its own stream.
  target_->sync_device();

  const int nstage = mode == Mode::Register ? 0 : cfg_.stage_threads;
  const int nreg = mode == Mode::Stage ? 0 : cfg_.register_threads;
  Job job(segs, plan, nstage);
  job.t0 = t0;
  // A stop asked before this copy's relays start still holds for it; the next copy starts afresh.
  struct ResetStop {
    std::atomic<bool>& flag;
    ~ResetStop() { flag = false; }
  } reset_stop{relay_stop_};
  std::vector<RelayRun> runs;  // the peers that take a share; the others say why not in the stats
  std::vector<RelayStats> skipped;
  if (relay) {
    if (relay->slots < 2 || relay->slot_bytes == 0)
      throw EngineError(ErrorKind::BadPlan, "a relay needs at least 2 slots of more than 0 bytes");
    runs.reserve(relay->peers.size());  // threads hold references into it
    for (int peer : relay->peers) {
      RelayStats rs;
      rs.peer = peer;
      rs.skipped = peer_problem(peer, mode);
      if (!rs.skipped.empty())
        skipped.push_back(rs);
      else
        runs.emplace_back(peer, *relay);
    }
    target_->bind_thread();
    if (!runs.empty()) job.direct = std::make_unique<InFlight>(*target_, relay->direct_window);
  }
  job.workers_left = nstage + nreg + static_cast<int>(runs.size());
  job.registrars_left = nreg;
  std::thread opener;
  if (ipc) {
    const size_t nb = ipc->handles.size();
    job.dest.reset(new std::atomic<uintptr_t>[nb]);
    std::vector<bool> seen(nb, false);
    for (size_t i = 0; i < nb; ++i) job.dest[i].store(0);
    for (const Unit& u : plan.units)
      if (!seen[u.dblk]) {
        seen[u.dblk] = true;
        job.open_order.push_back(u.dblk);
      }
    job.opens_done.store(false);
    opener = std::thread([this, &job, ipc] { ipc_opener(job, *ipc); });
  }

  std::vector<uint32_t> pending(plan.blocks.size());
  std::vector<uint64_t> next_rc(plan.blocks.size());
  for (size_t i = 0; i < pending.size(); ++i) {
    pending[i] = static_cast<uint32_t>(i);
    next_rc[i] = plan.blocks[i].rc0;
  }
  if (pending.empty()) job.all_dispatched = true;

  std::vector<std::thread> threads;
  try {
    for (int i = 0; i < nstage; ++i) threads.emplace_back([this, &job, i] { stage_worker(job, i); });
    for (int i = 0; i < nreg; ++i) threads.emplace_back([this, &job, i] { register_worker(job, i); });
    for (RelayRun& r : runs) threads.emplace_back([this, &job, &r] { relay_worker(job, r); });
  } catch (const std::exception& e) {  // no thread may outlive this frame (std::terminate)
    EngineError err(ErrorKind::Runtime, std::string("could not start the copy threads: ") + e.what());
    job.fail(err);
    for (auto& t : threads) t.join();
    if (opener.joinable()) opener.join();
    if (ipc) close_opened(*ipc);
    throw err;
  }

  CopyStats st;
  auto last_ready = Clock::now();
  auto last_tick = Clock::now();
  bool first = true;
  std::vector<uint32_t> ready;
  const auto poll = std::chrono::duration<double>(cfg_.poll_seconds);
  const double timeout = timeout_s > 0 ? timeout_s : std::numeric_limits<double>::infinity();

  for (;;) {
    if (!pending.empty()) {
      // Poll readiness: a block goes when every chunk it reads is ready.
      ready.clear();
      size_t w = 0;
      for (uint32_t id : pending) {
        const Block& b = plan.blocks[id];
        const SegmentDesc& sd = segs[b.seg];
        uint8_t state = kChunkReady;  // of the block: its first chunk not ready decides
        if (sd.ready) {
          while (next_rc[id] <= b.rc1) {
            uint8_t v = __atomic_load_n(sd.ready + next_rc[id], __ATOMIC_ACQUIRE);
            if (v == kChunkReady) {
              ++next_rc[id];
              continue;
            }
            state = v == kChunkPending ? kChunkPending : kChunkFailed;  // any other value: failed
            break;
          }
        }
        if (state == kChunkFailed) {
          uint64_t c = next_rc[id];
          job.fail(EngineError(ErrorKind::ChunkFailed,
                               "segment " + std::to_string(b.seg) + ": chunk " + std::to_string(c) + " (" +
                                   range_text(c * sd.chunk, sd.chunk) + ") was marked failed by the cache"));
          break;
        }
        if (state == kChunkReady)
          ready.push_back(id);
        else
          pending[w++] = id;
      }
      if (job.abort) break;
      pending.resize(w);
      if (!ready.empty()) {
        if (first) {
          st.first_ready_seconds = since(t0);
          first = false;
        }
        last_ready = Clock::now();
        st.last_ready_seconds = since(t0);
        std::lock_guard<std::mutex> lk(job.mu);
        for (uint32_t id : ready) {
          auto [a, e] = reg_range(job, plan.blocks[id]);
          bool direct = job.registrars_left > 0 && is_registered(a, e);
          (direct ? job.pinned : job.queue).push_back(id);
        }
        if (pending.empty()) job.all_dispatched = true;
        job.cv.notify_all();
      }
    }
    if (pending.empty()) {
      std::unique_lock<std::mutex> lk(job.mu);
      job.cv.wait_for(lk, std::chrono::milliseconds(20), [&] { return job.workers_left == 0 || job.abort; });
      if (job.workers_left == 0 || job.abort) break;
    } else {
      if (since(last_ready) > timeout) {
        const Block& b = plan.blocks[pending.front()];
        const SegmentDesc& sd = segs[b.seg];
        uint64_t c = next_rc[pending.front()];
        job.fail(EngineError(ErrorKind::Timeout, "segment " + std::to_string(b.seg) + ": chunk " + std::to_string(c) +
                                                     " (" + range_text(c * sd.chunk, sd.chunk) +
                                                     ") not ready after waiting " + std::to_string(timeout_s) +
                                                     " s with no chunk arriving"));
        break;
      }
      std::this_thread::sleep_for(poll);
    }
    if (tick && since(last_tick) > 0.05) {
      last_tick = Clock::now();
      if (!tick(job.done.load(), plan.total)) job.fail(EngineError(ErrorKind::Aborted, "copy aborted"));
    }
  }

  {
    std::lock_guard<std::mutex> lk(job.mu);
    job.abort = job.abort || job.error != nullptr;
    job.cv.notify_all();
  }
  for (auto& t : threads) t.join();
  if (opener.joinable()) opener.join();
  // Nothing may stay in flight: the caller may free tensors or unmap after we return.
  for (void* s : streams_) {
    try {
      target_->sync(s);
    } catch (const EngineError& e) {
      if (!job.error) job.error = std::make_unique<EngineError>(e);
    }
  }
  if (job.error) {
    if (ipc) close_opened(*ipc);
    throw *job.error;
  }
  if (tick && !tick(plan.total, plan.total)) {
    if (ipc) close_opened(*ipc);
    throw EngineError(ErrorKind::Aborted, "copy aborted");
  }

  st.seconds = since(t0);
  st.bytes = plan.total;
  st.staged_bytes = job.staged;
  st.registered_bytes = job.registered;
  st.newly_registered_bytes = job.newly_registered;
  st.blocks = plan.blocks.size();
  st.units = plan.units.size();
  st.register_calls = job.register_calls;
  st.register_seconds = job.register_ns / 1e9;
  if (job.pin_first_ns.load() != UINT64_MAX) {
    st.pin_start_seconds = job.pin_first_ns / 1e9;
    st.pin_end_seconds = job.pin_last_ns / 1e9;
  }
  st.last_queued_seconds = job.queued_last_ns / 1e9;
  st.ring_alloc_seconds = job.ring_alloc_seconds;
  st.stage_fill_seconds = job.stage_fill_ns / 1e9;
  st.stage_wait_seconds = job.stage_wait_ns / 1e9;
  st.register_fallback = job.fallback;
  for (RelayRun& r : runs) st.relays.push_back(r.stats);
  st.relays.insert(st.relays.end(), skipped.begin(), skipped.end());
  return st;
}

}  // namespace sllm
