#include "pins.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <iterator>
#include <utility>

namespace sllm {

Pins& Pins::of(const Target& t) {
  static Pins cuda, host;
  return std::strcmp(t.name(), "cuda") == 0 ? cuda : host;
}

std::map<uintptr_t, Pins::Pin>::iterator Pins::first_overlap(uintptr_t a, uintptr_t e) {
  auto it = pins_.upper_bound(a);
  if (it != pins_.begin() && std::prev(it)->second.end > a) --it;  // the pin that holds a, if one does
  return it != pins_.end() && it->first < e ? it : pins_.end();
}

std::vector<Pins::Ticket> Pins::cover(Target& t, uintptr_t a, uintptr_t e) {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {  // a pin in the range still being made or undone changes what covers it
    bool settling = false;
    for (auto j = first_overlap(a, e); j != pins_.end() && j->first < e; ++j) settling |= !j->second.settled;
    if (!settling) break;
    cv_.wait(lk);
  }
  std::vector<Ticket> out;
  std::vector<std::pair<uintptr_t, uintptr_t>> gaps;
  uintptr_t at = a;
  for (auto j = first_overlap(a, e); j != pins_.end() && j->first < e; ++j) {
    if (j->first > at) gaps.emplace_back(at, j->first);
    ++j->second.refs;
    out.push_back(Ticket{j->first, j->second.end, false});
    at = std::max(at, j->second.end);
  }
  if (at < e) gaps.emplace_back(at, e);
  for (auto& [ga, ge] : gaps) pins_[ga] = Pin{ge, 1, false, false};  // reserved: others wait for them
  lk.unlock();

  std::vector<bool> owned(gaps.size(), false);
  size_t made = 0;
  std::exception_ptr err;
  for (; made < gaps.size(); ++made) {
    try {
      owned[made] = t.register_range(reinterpret_cast<void*>(gaps[made].first), gaps[made].second - gaps[made].first);
    } catch (...) {
      err = std::current_exception();
      break;
    }
  }
  lk.lock();
  for (size_t i = 0; i < gaps.size(); ++i) {
    if (i < made) {
      Pin& p = pins_[gaps[i].first];
      p.owned = owned[i];
      p.settled = true;
      out.push_back(Ticket{gaps[i].first, gaps[i].second, owned[i]});
    } else {
      pins_.erase(gaps[i].first);
    }
  }
  cv_.notify_all();
  lk.unlock();
  if (err) {
    for (const Ticket& tk : out) release(t, tk.start);
    std::rethrow_exception(err);
  }
  std::sort(out.begin(), out.end(), [](const Ticket& x, const Ticket& y) { return x.start < y.start; });
  return out;
}

void Pins::release(Target& t, uintptr_t start) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = pins_.find(start);
  if (it == pins_.end() || --it->second.refs > 0) return;
  if (it->second.owned) {
    it->second.settled = false;  // nobody shares or re-pins these pages until the driver lets go
    lk.unlock();
    t.unregister_range(reinterpret_cast<void*>(start));
    lk.lock();
  }
  pins_.erase(start);
  cv_.notify_all();
}

}  // namespace sllm
