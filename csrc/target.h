// Where the bytes go: a CUDA device, or plain host memory for GPU-free tests.
//
// Both targets expose the same stream/event/pinned-memory vocabulary, so the
// pipeline in engine.cpp (chunking, readiness, claiming, the pinned ring) runs
// unchanged in CI; the host target just does each copy at once with memcpy.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace sllm {

class Target {
 public:
  virtual ~Target() = default;
  virtual const char* name() const = 0;
  virtual void bind_thread() {}
  virtual void* create_stream() = 0;
  virtual void destroy_stream(void* s) = 0;
  virtual void* create_event() = 0;
  virtual void destroy_event(void* e) = 0;
  virtual void record(void* ev, void* stream) = 0;
  virtual void wait(void* ev) = 0;
  virtual void copy(void* dst, const void* src, size_t n, void* stream) = 0;
  virtual void sync(void* stream) = 0;
  virtual void sync_device() = 0;
  virtual void* alloc_pinned(size_t n) = 0;
  virtual void free_pinned(void* p) = 0;
  // Pins [p, p+n) in place. Returns false when it was already pinned by someone
  // else (nothing to undo). Throws EngineError(Cuda) on failure.
  virtual bool register_range(void* p, size_t n) = 0;
  virtual void unregister_range(void* p) = 0;
  // CUDA IPC (destinations in another process's allocations). `handle` is the
  // 64-byte cudaIpcMemHandle_t. The host target refuses these.
  virtual void* ipc_open(const void* handle) = 0;
  virtual void ipc_close(void* p) = 0;
  // Device ordinal of a PCI bus id ("0000:41:00.0"), and this target's own.
  virtual int device_of_bus(const std::string& bus) = 0;
  virtual std::string bus_id() = 0;
  // Peer relays (relay.cpp). "" when `peer` can carry a share into this target's
  // device (it exists, is another GPU, peer access works both ways: enabled here),
  // else why not. The host target has no peers.
  virtual std::string peer_problem(int peer) = 0;
  virtual void bind_device(int dev) = 0;  // this thread's device (a relay works on its peer)
  virtual void* alloc_device(size_t n) = 0;  // on this thread's device
  virtual void free_device(void* p) = 0;
  virtual void copy_peer(void* dst, int dst_dev, const void* src, int src_dev, size_t n, void* stream) = 0;
  virtual int device() const = 0;
};

std::unique_ptr<Target> make_host_target();
std::unique_ptr<Target> make_cuda_target(int device, const std::string& cudart_path, const std::string& fallback);

}  // namespace sllm
