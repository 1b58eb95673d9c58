// The few CUDA runtime entry points the copy engine needs, resolved at run time.
//
// Nothing here links against libcudart: the runtime torch already loaded is
// opened with dlopen, so the package builds (and its host target runs) on a
// machine without CUDA. Types and constants are declared locally for the
// same reason; their values are the stable ones of CUDA 12/13.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace sllm {

using cudaError_t = int;
using cudaStream_t = void*;
using cudaEvent_t = void*;

constexpr cudaError_t kCudaSuccess = 0;
constexpr cudaError_t kCudaErrorNotReady = 600;
constexpr cudaError_t kCudaErrorHostMemoryAlreadyRegistered = 712;
constexpr cudaError_t kCudaErrorHostMemoryNotRegistered = 713;
constexpr cudaError_t kCudaErrorPeerAccessAlreadyEnabled = 704;

constexpr int kMemcpyHostToDevice = 1;
constexpr unsigned kStreamNonBlocking = 0x01;
constexpr unsigned kEventDisableTiming = 0x02;
constexpr unsigned kHostRegisterPortable = 0x01;
constexpr unsigned kHostRegisterReadOnly = 0x08;
constexpr unsigned kHostAllocPortable = 0x01;
constexpr unsigned kIpcMemLazyEnablePeerAccess = 0x01;
constexpr int kMemoryTypeDevice = 2;
constexpr size_t kIpcHandleBytes = 64;

// cudaIpcMemHandle_t: opaque, passed by value (same layout, so the same ABI).
struct IpcMemHandle {
  char reserved[kIpcHandleBytes];
};

struct CudaApi {
  cudaError_t (*SetDevice)(int);
  cudaError_t (*GetDeviceCount)(int*);
  cudaError_t (*DeviceSynchronize)();
  cudaError_t (*StreamCreateWithFlags)(cudaStream_t*, unsigned);
  cudaError_t (*StreamDestroy)(cudaStream_t);
  cudaError_t (*StreamSynchronize)(cudaStream_t);
  cudaError_t (*EventCreateWithFlags)(cudaEvent_t*, unsigned);
  cudaError_t (*EventDestroy)(cudaEvent_t);
  cudaError_t (*EventRecord)(cudaEvent_t, cudaStream_t);
  cudaError_t (*EventSynchronize)(cudaEvent_t);
  cudaError_t (*EventQuery)(cudaEvent_t);
  cudaError_t (*MemcpyAsync)(void*, const void*, size_t, int, cudaStream_t);
  cudaError_t (*HostRegister)(void*, size_t, unsigned);
  cudaError_t (*HostUnregister)(void*);
  cudaError_t (*HostAlloc)(void**, size_t, unsigned);
  cudaError_t (*FreeHost)(void*);
  cudaError_t (*GetLastError)();
  const char* (*GetErrorName)(cudaError_t);
  const char* (*GetErrorString)(cudaError_t);
  int (*RuntimeGetVersion)(int*);
  cudaError_t (*PointerGetAttributes)(void*, const void*);  // cudaPointerAttributes*, read as raw bytes
  cudaError_t (*GetDevice)(int*);
  cudaError_t (*IpcGetMemHandle)(IpcMemHandle*, void*);
  cudaError_t (*IpcOpenMemHandle)(void**, IpcMemHandle, unsigned);
  cudaError_t (*IpcCloseMemHandle)(void*);
  cudaError_t (*DeviceGetByPCIBusId)(int*, const char*);
  cudaError_t (*DeviceGetPCIBusId)(char*, int, int);
  // Peer relays (optional: without them a copy uses its own link only).
  cudaError_t (*Malloc)(void**, size_t);
  cudaError_t (*Free)(void*);
  cudaError_t (*DeviceCanAccessPeer)(int*, int, int);
  cudaError_t (*DeviceEnablePeerAccess)(int, unsigned);
  cudaError_t (*MemcpyPeerAsync)(void*, int, const void*, int, size_t, cudaStream_t);

  void* handle = nullptr;
  std::string path;
};

// Opens the runtime: `path` first (the one torch loaded), then the sonames
// already present in the process, then any on the loader path, then
// `fallback` (a wheel's copy found by Python without importing torch).
// The first successful load is kept for the process. Throws
// std::runtime_error with one line saying what was tried.
const CudaApi& load_cuda(const std::string& path, const std::string& fallback = "");

// cuMemGetAddressRange_v2 from the driver (libcuda.so.1, already loaded by
// the runtime): the cudaMalloc allocation holding `ptr`. Returns the CUresult.
int driver_address_range(uint64_t ptr, uint64_t* base, size_t* size);

// An optional entry point, or a one-line error naming it.
template <typename F>
F need(F fn, const char* name) {
  if (!fn) throw std::runtime_error(std::string("the CUDA runtime lacks ") + name);
  return fn;
}

// "cudaMemcpyAsync: cudaErrorInvalidValue (1): invalid argument"
std::string cuda_error_text(const CudaApi& api, const char* call, cudaError_t rc);

}  // namespace sllm
