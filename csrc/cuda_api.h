// The few CUDA runtime entry points the copy engine needs, resolved at run time.
//
// Nothing here links against libcudart: the runtime torch already loaded is
// opened with dlopen, so the package builds (and its host target runs) on a
// machine without CUDA. Types and constants are declared locally for the
// same reason; their values are the stable ones of CUDA 12/13.
#pragma once

#include <cstddef>
#include <string>

namespace sllm {

using cudaError_t = int;
using cudaStream_t = void*;
using cudaEvent_t = void*;

constexpr cudaError_t kCudaSuccess = 0;
constexpr cudaError_t kCudaErrorNotReady = 600;
constexpr cudaError_t kCudaErrorHostMemoryAlreadyRegistered = 712;
constexpr cudaError_t kCudaErrorHostMemoryNotRegistered = 713;

constexpr int kMemcpyHostToDevice = 1;
constexpr unsigned kStreamNonBlocking = 0x01;
constexpr unsigned kEventDisableTiming = 0x02;
constexpr unsigned kHostRegisterPortable = 0x01;
constexpr unsigned kHostRegisterReadOnly = 0x08;
constexpr unsigned kHostAllocPortable = 0x01;

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

  void* handle = nullptr;
  std::string path;
};

// Opens the runtime: `path` first (the one torch loaded), then the sonames
// already present in the process, then any on the loader path. Throws
// std::runtime_error with one line saying what was tried.
const CudaApi& load_cuda(const std::string& path);

// "cudaMemcpyAsync: cudaErrorInvalidValue (1): invalid argument"
std::string cuda_error_text(const CudaApi& api, const char* call, cudaError_t rc);

}  // namespace sllm
