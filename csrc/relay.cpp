#include "relay.h"

#include <algorithm>
#include <chrono>

#include "engine.h"
#include "job.h"

namespace sllm {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

InFlight::~InFlight() {
  for (auto& [ev, n] : events_) target_.destroy_event(ev);
}

int64_t InFlight::claim(const std::function<int64_t()>& claim, const std::function<uint64_t(int64_t)>& bytes,
                        const std::atomic<bool>& abort) {
  std::unique_lock<std::mutex> lk(mu_);
  while (queued_ >= limit_) {
    if (abort) return -1;
    if (events_.empty()) {  // all claimed, none queued yet (still pinning): their events come
      cv_.wait_for(lk, std::chrono::milliseconds(1));
      continue;
    }
    auto [ev, n] = events_.front();
    events_.pop_front();
    target_.wait(ev);
    target_.destroy_event(ev);
    queued_ -= n;
  }
  int64_t id = claim();
  if (id >= 0) queued_ += bytes(id);
  return id;
}

void InFlight::queued(void* stream, uint64_t bytes) {
  void* ev = target_.create_event();
  target_.record(ev, stream);
  std::lock_guard<std::mutex> lk(mu_);
  events_.emplace_back(ev, bytes);
  cv_.notify_all();
}

void InFlight::dropped(uint64_t bytes) {
  std::lock_guard<std::mutex> lk(mu_);
  queued_ -= bytes;
  cv_.notify_all();
}

std::string Engine::peer_problem(int peer, Mode mode) {
  if (mode != Mode::Register)
    return "relays copy from pinned segments; this copy stages (its segments are not pinned)";
  if (std::find(peers_enabled_.begin(), peers_enabled_.end(), peer) != peers_enabled_.end()) return "";
  std::string why = target_->peer_problem(peer);
  if (why.empty()) peers_enabled_.push_back(peer);
  return why;
}

void Engine::relay_worker(Job& job, RelayRun& run) {
  struct Hop {
    uint8_t* dst;
    uint64_t at, n;
  };
  std::vector<Hop> hops;  // the current slot's bytes, bound for the target
  int cur = -1;
  uint64_t fill = run.slot_bytes;  // forces a first slot
  const int here = cfg_.device;
  Clock::time_point t0{};
  bool started = false;
  auto flush = [&] {
    if (cur < 0 || hops.empty()) return;
    for (const Hop& h : hops) target_->copy_peer(h.dst, here, run.staging + cur * run.slot_bytes + h.at, run.peer, h.n,
                                                 run.streams[cur]);
    target_->record(run.events[cur], run.streams[cur]);
    run.used[cur] = true;
    hops.clear();
  };
  try {
    target_->bind_device(run.peer);
    try {
      run.staging = static_cast<uint8_t*>(target_->alloc_device(run.slot_bytes * run.nslots));
    } catch (const EngineError& e) {  // no room on the peer: it carries nothing, the copy goes on
      run.stats.skipped = std::string("no staging memory on the peer: ") + e.what();
    }
    if (run.staging) {
      run.stats.staging_bytes = run.slot_bytes * run.nslots;
      for (int i = 0; i < run.nslots; ++i) {
        run.streams.push_back(target_->create_stream());
        run.events.push_back(target_->create_event());
      }
      run.used.assign(run.nslots, false);
    }
    int64_t id;
    while (run.staging && !job.abort && (id = relay_stop_ ? -1 : job.claim(Claimer::Relay)) >= 0) {
      if (!started) {
        t0 = Clock::now();
        started = true;
      }
      const Block& b = job.plan.blocks[id];
      auto [a, e] = reg_range(job, b);
      if (!is_registered(a, e)) {  // register mode pins as it goes; the registrars may not have reached it
        while (!job.opens_done.load(std::memory_order_acquire) && !job.abort)  // as register_worker: no
          std::this_thread::sleep_for(std::chrono::microseconds(50));          // pinning beside IPC opens
        auto tp = Clock::now();
        Job::keep_min(job.pin_first_ns, job.now_ns());
        uint64_t calls = 0;
        job.newly_registered += pin(a, e, &calls);  // counted as the registrars' pins are: the copy's stats
        job.register_calls += calls;
        job.register_ns += static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - tp).count());
        Job::keep_max(job.pin_last_ns, job.now_ns());
      }
      const uint8_t* base = job.segs[b.seg].base;
      try {
        for (size_t u = b.u0; u < b.u1; ++u) {
          const Unit& unit = job.plan.units[u];
          uint8_t* dst = job.dst(unit);
          for (uint64_t off = 0; off < unit.n;) {
            if (fill == run.slot_bytes) {
              flush();
              cur = (cur + 1) % run.nslots;
              if (run.used[cur]) target_->wait(run.events[cur]);  // its hop to the target has landed
              fill = 0;
            }
            uint64_t k = std::min(unit.n - off, run.slot_bytes - fill);
            copy_pinned(run.staging + cur * run.slot_bytes + fill, base + unit.off + off, k, run.streams[cur]);
            hops.push_back({dst + off, fill, k});
            fill += k;
            off += k;
          }
        }
        flush();
      } catch (const EngineError& err) {
        if (err.kind != ErrorKind::Cuda) throw;
        // The peer path failed (pinning, a peer copy): drain it (an error there fails the copy: the
        // state of its earlier blocks is unknown), then this block goes the direct way, and the rest too.
        hops.clear();
        for (void* s : run.streams) target_->sync(s);
        run.stats.skipped = std::string("failed, the rest went direct: ") + err.what();
        target_->bind_device(here);
        for (size_t u = b.u0; u < b.u1; ++u) {
          const Unit& unit = job.plan.units[u];
          copy_pinned(job.dst(unit), base + unit.off, unit.n, streams_[0]);
        }
        job.done += b.bytes;
        target_->bind_device(run.peer);  // the cleanup below is on the peer
        break;
      }
      fill = run.slot_bytes;  // next block starts a fresh slot: a block's bytes land before it counts as done
      run.stats.bytes += b.bytes;
      Job::keep_max(job.queued_last_ns, job.now_ns());
      job.done += b.bytes;
    }
    if (relay_stop_ && run.stats.skipped.empty()) run.stats.skipped = "stopped: another load wanted this GPU";
  } catch (const EngineError& e) {
    job.fail(e);
  } catch (const std::exception& e) {
    job.fail(EngineError(ErrorKind::Runtime, e.what()));
  }
  // Nothing may stay in flight on the peer: synchronize, then free (also after an error).
  for (void* s : run.streams) {
    try {
      target_->sync(s);
    } catch (const EngineError& e) {
      job.fail(e);
    }
  }
  if (started) run.stats.busy_seconds = since(t0);
  for (void* ev : run.events) target_->destroy_event(ev);
  for (void* s : run.streams) target_->destroy_stream(s);
  target_->free_device(run.staging);
  run.staging = nullptr;
  job.worker_exit(false);
}

}  // namespace sllm
