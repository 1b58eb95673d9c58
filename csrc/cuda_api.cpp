#include "cuda_api.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>
#include <vector>

namespace sllm {
namespace {

std::mutex g_mu;
CudaApi g_api;
bool g_loaded = false;

void* open_runtime(const std::string& path, const std::string& fallback, std::string* tried) {
  std::vector<std::pair<std::string, int>> cands;
  if (!path.empty()) cands.push_back({path, RTLD_NOW | RTLD_LOCAL});
  // Prefer a runtime the process already holds (torch's), so both agree on contexts.
  for (const char* so : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"})
    cands.push_back({so, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD});
  for (const char* so : {"libcudart.so.13", "libcudart.so.12"}) cands.push_back({so, RTLD_NOW | RTLD_LOCAL});
  if (!fallback.empty()) cands.push_back({fallback, RTLD_NOW | RTLD_LOCAL});
  for (auto& [name, flags] : cands) {
    void* h = dlopen(name.c_str(), flags);
    if (h) return h;
    if (!tried->empty()) *tried += ", ";
    *tried += name;
  }
  return nullptr;
}

template <typename F>
void bind(void* h, const char* name, F* out) {
  void* sym = dlsym(h, name);
  if (!sym) throw std::runtime_error(std::string("CUDA runtime lacks ") + name);
  *out = reinterpret_cast<F>(sym);
}

// IPC and bus-id entry points are optional: a runtime without them still copies.
template <typename F>
void bind_opt(void* h, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(h, name));
}

}  // namespace

const CudaApi& load_cuda(const std::string& path, const std::string& fallback) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_loaded) return g_api;
  std::string tried;
  void* h = open_runtime(path, fallback, &tried);
  if (!h) throw std::runtime_error("no CUDA runtime could be opened (tried " + tried + ")");
  CudaApi a;
  bind(h, "cudaSetDevice", &a.SetDevice);
  bind(h, "cudaGetDeviceCount", &a.GetDeviceCount);
  bind(h, "cudaDeviceSynchronize", &a.DeviceSynchronize);
  bind(h, "cudaStreamCreateWithFlags", &a.StreamCreateWithFlags);
  bind(h, "cudaStreamDestroy", &a.StreamDestroy);
  bind(h, "cudaStreamSynchronize", &a.StreamSynchronize);
  bind(h, "cudaEventCreateWithFlags", &a.EventCreateWithFlags);
  bind(h, "cudaEventDestroy", &a.EventDestroy);
  bind(h, "cudaEventRecord", &a.EventRecord);
  bind(h, "cudaEventSynchronize", &a.EventSynchronize);
  bind(h, "cudaEventQuery", &a.EventQuery);
  bind(h, "cudaMemcpyAsync", &a.MemcpyAsync);
  bind(h, "cudaHostRegister", &a.HostRegister);
  bind(h, "cudaHostUnregister", &a.HostUnregister);
  bind(h, "cudaHostAlloc", &a.HostAlloc);
  bind(h, "cudaFreeHost", &a.FreeHost);
  bind(h, "cudaGetLastError", &a.GetLastError);
  bind(h, "cudaGetErrorName", &a.GetErrorName);
  bind(h, "cudaGetErrorString", &a.GetErrorString);
  bind(h, "cudaRuntimeGetVersion", &a.RuntimeGetVersion);
  bind(h, "cudaPointerGetAttributes", &a.PointerGetAttributes);
  bind_opt(h, "cudaGetDevice", &a.GetDevice);
  bind_opt(h, "cudaIpcGetMemHandle", &a.IpcGetMemHandle);
  bind_opt(h, "cudaIpcOpenMemHandle", &a.IpcOpenMemHandle);
  bind_opt(h, "cudaIpcCloseMemHandle", &a.IpcCloseMemHandle);
  bind_opt(h, "cudaDeviceGetByPCIBusId", &a.DeviceGetByPCIBusId);
  bind_opt(h, "cudaDeviceGetPCIBusId", &a.DeviceGetPCIBusId);
  bind_opt(h, "cudaMalloc", &a.Malloc);
  bind_opt(h, "cudaFree", &a.Free);
  bind_opt(h, "cudaDeviceCanAccessPeer", &a.DeviceCanAccessPeer);
  bind_opt(h, "cudaDeviceEnablePeerAccess", &a.DeviceEnablePeerAccess);
  bind_opt(h, "cudaMemcpyPeerAsync", &a.MemcpyPeerAsync);
  a.handle = h;
  Dl_info info{};
  a.path = dladdr(reinterpret_cast<void*>(a.SetDevice), &info) && info.dli_fname ? info.dli_fname : path;
  g_api = a;
  g_loaded = true;
  return g_api;
}

int driver_address_range(uint64_t ptr, uint64_t* base, size_t* size) {
  using Fn = int (*)(uint64_t*, size_t*, uint64_t);
  static Fn fn = [] {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h) h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    return h ? reinterpret_cast<Fn>(dlsym(h, "cuMemGetAddressRange_v2")) : nullptr;
  }();
  if (!fn) throw std::runtime_error("the CUDA driver (libcuda.so.1) lacks cuMemGetAddressRange_v2");
  return fn(base, size, ptr);
}

std::string cuda_error_text(const CudaApi& api, const char* call, cudaError_t rc) {
  const char* name = api.GetErrorName ? api.GetErrorName(rc) : nullptr;
  const char* text = api.GetErrorString ? api.GetErrorString(rc) : nullptr;
  std::string s = std::string(call) + ": " + (name ? name : "cudaError") + " (" + std::to_string(rc) + ")";
  if (text) s += std::string(": ") + text;
  return s;
}

}  // namespace sllm
