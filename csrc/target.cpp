#include "target.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cuda_api.h"
#include "errors.h"

namespace sllm {
namespace {

class HostTarget final : public Target {
 public:
  const char* name() const override { return "host"; }
  void* create_stream() override { return this; }  // any non-null token
  void destroy_stream(void*) override {}
  void* create_event() override { return this; }
  void destroy_event(void*) override {}
  void record(void*, void*) override {}
  void wait(void*) override {}
  void copy(void* dst, const void* src, size_t n, void*) override { std::memcpy(dst, src, n); }
  void sync(void*) override {}
  void sync_device() override {}
  void* alloc_pinned(size_t n) override {
    void* p = std::aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    if (!p) throw EngineError(ErrorKind::Runtime, "out of host memory for the staging ring");
    return p;
  }
  void free_pinned(void* p) override { std::free(p); }
  bool register_range(void*, size_t) override { return true; }
  void unregister_range(void*) override {}
  void* ipc_open(const void*) override { throw no_ipc(); }
  void ipc_close(void*) override { throw no_ipc(); }
  int device_of_bus(const std::string&) override { throw no_ipc(); }
  std::string bus_id() override { return "host"; }
  std::string peer_problem(int) override { return "relays need a CUDA engine (target='cuda'), not the host target"; }
  void bind_device(int) override {}
  void* alloc_device(size_t) override { throw EngineError(ErrorKind::Runtime, "the host target has no devices"); }
  void free_device(void*) override {}
  void copy_peer(void*, int, const void*, int, size_t, void*) override {
    throw EngineError(ErrorKind::Runtime, "the host target has no devices");
  }
  int device() const override { return -1; }

 private:
  static EngineError no_ipc() {
    return EngineError(ErrorKind::Runtime, "CUDA IPC needs a CUDA engine (target='cuda'), not the host target");
  }
};

class CudaTarget final : public Target {
 public:
  CudaTarget(int device, const std::string& path, const std::string& fallback) : device_(device) {
    try {
      api_ = &load_cuda(path, fallback);
    } catch (const std::exception& e) {
      throw EngineError(ErrorKind::Cuda, e.what());
    }
    int count = 0;
    check("cudaGetDeviceCount", api_->GetDeviceCount(&count));
    if (device < 0 || device >= count)
      throw EngineError(ErrorKind::Cuda, "CUDA device " + std::to_string(device) + " does not exist (" +
                                             std::to_string(count) + " visible)");
    bind_thread();
  }
  const char* name() const override { return "cuda"; }
  void bind_thread() override { check("cudaSetDevice", api_->SetDevice(device_)); }
  void* create_stream() override {
    void* s = nullptr;
    check("cudaStreamCreateWithFlags", api_->StreamCreateWithFlags(&s, kStreamNonBlocking));
    return s;
  }
  void destroy_stream(void* s) override { api_->StreamDestroy(s); }
  void* create_event() override {
    void* e = nullptr;
    check("cudaEventCreateWithFlags", api_->EventCreateWithFlags(&e, kEventDisableTiming));
    return e;
  }
  void destroy_event(void* e) override { api_->EventDestroy(e); }
  void record(void* ev, void* stream) override { check("cudaEventRecord", api_->EventRecord(ev, stream)); }
  void wait(void* ev) override { check("cudaEventSynchronize", api_->EventSynchronize(ev)); }
  void copy(void* dst, const void* src, size_t n, void* stream) override {
    check("cudaMemcpyAsync", api_->MemcpyAsync(dst, src, n, kMemcpyHostToDevice, stream));
  }
  void sync(void* stream) override { check("cudaStreamSynchronize", api_->StreamSynchronize(stream)); }
  void sync_device() override { check("cudaDeviceSynchronize", api_->DeviceSynchronize()); }
  void* alloc_pinned(size_t n) override {
    void* p = nullptr;
    check("cudaHostAlloc", api_->HostAlloc(&p, n, kHostAllocPortable));
    return p;
  }
  void free_pinned(void* p) override { api_->FreeHost(p); }
  bool register_range(void* p, size_t n) override {
    // Segments are mapped read-only; ReadOnly lets the driver pin them as such.
    // Portable: a sidecar with one engine per GPU pins a segment once for all of them.
    unsigned flags = kHostRegisterPortable | (read_only_ok_ ? kHostRegisterReadOnly : 0);
    cudaError_t rc = api_->HostRegister(p, n, flags);
    if (rc != kCudaSuccess && rc != kCudaErrorHostMemoryAlreadyRegistered && read_only_ok_) {
      api_->GetLastError();
      read_only_ok_ = false;
      rc = api_->HostRegister(p, n, kHostRegisterPortable);
    }
    if (rc == kCudaErrorHostMemoryAlreadyRegistered || (rc != kCudaSuccess && is_pinned(p))) {
      api_->GetLastError();  // already page-locked (cudaHostAlloc memory is refused with InvalidValue)
      return false;
    }
    check("cudaHostRegister", rc);
    return true;
  }
  void unregister_range(void* p) override {
    if (api_->HostUnregister(p) != kCudaSuccess) api_->GetLastError();
  }
  void* ipc_open(const void* handle) override {
    IpcMemHandle h;
    std::memcpy(h.reserved, handle, kIpcHandleBytes);
    void* p = nullptr;
    check("cudaIpcOpenMemHandle", need(api_->IpcOpenMemHandle, "cudaIpcOpenMemHandle")(&p, h, kIpcMemLazyEnablePeerAccess));
    return p;
  }
  void ipc_close(void* p) override { check("cudaIpcCloseMemHandle", need(api_->IpcCloseMemHandle, "cudaIpcCloseMemHandle")(p)); }
  int device_of_bus(const std::string& bus) override {
    int dev = -1;
    check("cudaDeviceGetByPCIBusId", need(api_->DeviceGetByPCIBusId, "cudaDeviceGetByPCIBusId")(&dev, bus.c_str()));
    return dev;
  }
  std::string bus_id() override {
    char buf[32] = {};
    check("cudaDeviceGetPCIBusId", need(api_->DeviceGetPCIBusId, "cudaDeviceGetPCIBusId")(buf, sizeof buf, device_));
    return buf;
  }
  std::string peer_problem(int peer) override {
    if (peer == device_) return "it is the GPU being loaded";
    if (!api_->Malloc || !api_->Free || !api_->DeviceCanAccessPeer || !api_->DeviceEnablePeerAccess ||
        !api_->MemcpyPeerAsync)
      return "the CUDA runtime lacks the peer-to-peer entry points";
    int count = 0;
    check("cudaGetDeviceCount", api_->GetDeviceCount(&count));
    if (peer < 0 || peer >= count)
      return "CUDA device " + std::to_string(peer) + " does not exist (" + std::to_string(count) + " visible)";
    int there = 0, back = 0;
    check("cudaDeviceCanAccessPeer", api_->DeviceCanAccessPeer(&there, peer, device_));
    check("cudaDeviceCanAccessPeer", api_->DeviceCanAccessPeer(&back, device_, peer));
    if (!there || !back) return "no peer access between GPU " + std::to_string(device_) + " and GPU " + std::to_string(peer);
    for (auto [from, to] : {std::pair<int, int>{peer, device_}, {device_, peer}}) {
      bind_device(from);
      cudaError_t rc = api_->DeviceEnablePeerAccess(to, 0);
      if (rc != kCudaSuccess) api_->GetLastError();
      if (rc != kCudaSuccess && rc != kCudaErrorPeerAccessAlreadyEnabled) {
        bind_thread();
        return cuda_error_text(*api_, "cudaDeviceEnablePeerAccess", rc);
      }
    }
    bind_thread();
    return "";
  }
  void bind_device(int dev) override { check("cudaSetDevice", api_->SetDevice(dev)); }
  void* alloc_device(size_t n) override {
    void* p = nullptr;
    check("cudaMalloc", api_->Malloc(&p, n));
    return p;
  }
  void free_device(void* p) override {
    if (p && api_->Free(p) != kCudaSuccess) api_->GetLastError();
  }
  void copy_peer(void* dst, int dst_dev, const void* src, int src_dev, size_t n, void* stream) override {
    check("cudaMemcpyPeerAsync", api_->MemcpyPeerAsync(dst, dst_dev, src, src_dev, n, stream));
  }
  int device() const override { return device_; }

 private:
  bool is_pinned(const void* p) {
    // cudaHostAlloc and VMM host memory refuse registration but need none.
    // cudaPointerAttributes starts with the memory type; 128 bytes covers it on CUDA 12/13.
    alignas(8) unsigned char attr[128] = {};
    if (api_->PointerGetAttributes(attr, p) != kCudaSuccess) {
      api_->GetLastError();
      return false;
    }
    int type;
    std::memcpy(&type, attr, sizeof type);
    return type != 0;  // known to CUDA (pinned, VMM-mapped, managed): copy from it as it is
  }
  void check(const char* call, cudaError_t rc) {
    if (rc == kCudaSuccess) return;
    api_->GetLastError();  // clear the non-sticky error so later calls are judged on their own
    throw EngineError(ErrorKind::Cuda, cuda_error_text(*api_, call, rc));
  }
  const CudaApi* api_ = nullptr;
  int device_;
  std::atomic<bool> read_only_ok_{true};
};

}  // namespace

std::unique_ptr<Target> make_host_target() { return std::make_unique<HostTarget>(); }
std::unique_ptr<Target> make_cuda_target(int device, const std::string& path, const std::string& fallback) {
  return std::make_unique<CudaTarget>(device, path, fallback);
}

}  // namespace sllm
