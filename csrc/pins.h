// The page-locked host ranges of one process, shared by every copy engine in it.
//
// A pin (cudaHostRegister) belongs to the process, not to the engine that made it: the driver
// refuses to register a page already in a registration (712), and refuses a copy whose source spans
// two registrations, or a registered and an unregistered range (cudaErrorInvalidValue). Engines of
// one process reading the same mapping (one per GPU) each pin the ranges their own blocks read, and
// those overlap. So pins live here: a range is covered by the pins already made plus new pins for
// the gaps between them, engines hold references, the last reference unpins, and a copy straight
// from host memory is split so that each piece lies inside one pin.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "target.h"

namespace sllm {

class Pins {
 public:
  struct Ticket {
    uintptr_t start, end;  // a pin the caller now holds one reference to
    bool pinned_now;       // made by this call (false: shared, or pinned outside this registry)
  };

  // The registry of one kind of target (the host target's no-op pins are not CUDA's).
  static Pins& of(const Target& t);

  // References to pins that together hold every page of [a, e): the ones already made (shared) and
  // new ones for the gaps. Waits while an overlapping pin is being made or undone. Throws what
  // Target::register_range throws, holding nothing then.
  std::vector<Ticket> cover(Target& t, uintptr_t a, uintptr_t e);
  // Gives back one reference to the pin starting at `start`; the last one unpins.
  void release(Target& t, uintptr_t start);

 private:
  struct Pin {
    uintptr_t end;
    int refs;
    bool owned;    // ours to unregister (a range the driver said was pinned already is not)
    bool settled;  // false while being registered or unregistered: others wait for it
  };
  std::map<uintptr_t, Pin>::iterator first_overlap(uintptr_t a, uintptr_t e);

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uintptr_t, Pin> pins_;  // disjoint
};

}  // namespace sllm
