#include "direct_reads.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace sllm {
namespace {

constexpr int64_t kPending = INT64_MIN;

long io_setup(unsigned n, aio_context_t* ctx) { return syscall(SYS_io_setup, n, ctx); }
long io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
long io_submit(aio_context_t ctx, long n, iocb** cbs) { return syscall(SYS_io_submit, ctx, n, cbs); }
long io_getevents(aio_context_t ctx, long min, long max, io_event* ev) {
  return syscall(SYS_io_getevents, ctx, min, max, ev, nullptr);
}

}  // namespace

DirectReads::DirectReads(int depth, uint64_t overlap)
    : depth_(depth), overlap_(overlap), cbs_(depth), events_(depth) {
  if (depth < 1) throw std::invalid_argument("read depth must be at least 1");
  if (io_setup(static_cast<unsigned>(depth), &ctx_) != 0)
    throw std::runtime_error(std::string("io_setup: ") + std::strerror(errno));
}

DirectReads::~DirectReads() {
  drain();
  io_destroy(ctx_);
}

void DirectReads::drain() {
  while (in_flight_ > 0) {
    const long got = io_getevents(ctx_, in_flight_, depth_, events_.data());
    if (got < 0) {
      if (errno == EINTR) continue;
      std::abort();  // a read may still land in memory the caller is about to reuse: nothing safe remains
    }
    in_flight_ -= static_cast<int>(got);
  }
}

HashedRead DirectReads::read(int fd, uint8_t* dst, uint64_t len, uint64_t offset, Xxh3& hash) {
  HashedRead r;
  const uint64_t steps = (len + kDirectStep - 1) / kDirectStep;
  results_.assign(steps, kPending);
  cbs_.resize(steps);  // one control block per step: the kernel answers each by its index
  uint64_t submitted = 0, hashed = 0;
  bool ended = false;   // an error or a short read: nothing after it counts
  bool resume = false;  // an aligned short read, an interrupted step or no room to queue: the rest via read_direct
  while (!ended && hashed < steps) {
    while (submitted < steps && in_flight_ < depth_) {
      const uint64_t at = submitted * kDirectStep, left = len - at;
      iocb& cb = cbs_[submitted];
      std::memset(&cb, 0, sizeof cb);
      cb.aio_lio_opcode = IOCB_CMD_PREAD;
      cb.aio_fildes = static_cast<uint32_t>(fd);
      cb.aio_buf = reinterpret_cast<uint64_t>(dst + at);
      cb.aio_nbytes = direct_request(left, overlap_);
      cb.aio_offset = static_cast<int64_t>(offset + at);
      cb.aio_data = submitted;
      iocb* one = &cb;
      if (io_submit(ctx_, 1, &one) == 1) {
        ++submitted;
        ++in_flight_;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN && in_flight_ > 0) break;  // the queue is full: wait for one to land first
      if (submitted == 0 && (errno == EINVAL || errno == EOPNOTSUPP || errno == EAGAIN))
        return read_direct(fd, dst, len, offset, hash, overlap_);  // no AIO for this file (or now): one at a time
      if (errno == EAGAIN) {  // nothing in flight and every landed step hashed: the rest one at a time
        resume = true;
        ended = true;
        break;
      }
      r.err = errno;
      ended = true;
      break;
    }
    if (ended) break;
    const long got = io_getevents(ctx_, 1, depth_, events_.data());
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      break;
    }
    in_flight_ -= static_cast<int>(got);
    for (long i = 0; i < got; ++i) results_[events_[i].data] = events_[i].res;
    // Hash what landed, in file order, while the later reads are still at the disk.
    while (hashed < submitted && results_[hashed] != kPending) {
      const int64_t res = results_[hashed];
      if (res == -EINTR) {  // interrupted before it read: this step and the rest one at a time
        resume = true;
        ended = true;
        break;
      }
      if (res < 0) {
        r.err = static_cast<int>(-res);
        ended = true;
        break;
      }
      const uint64_t left = len - hashed * kDirectStep, want = left < kDirectStep ? left : kDirectStep;
      const uint64_t kept = static_cast<uint64_t>(res) < want ? static_cast<uint64_t>(res) : want;
      hash.update(dst + r.done, kept);
      r.done += kept;
      ++hashed;
      if (kept < want) {  // the file's end (an unaligned count), else a short read to go on from
        ended = true;
        resume = res > 0 && res % static_cast<int64_t>(kDirectAlign) == 0;
        break;
      }
    }
  }
  drain();
  if (resume && r.done < len) {
    const HashedRead rest = read_direct(fd, dst + r.done, len - r.done, offset + r.done, hash, overlap_);
    r.done += rest.done;
    r.err = rest.err;
  }
  return r;
}

}  // namespace sllm
