#include "ipc.h"

#include <cstring>

#include "cuda_api.h"
#include "errors.h"

namespace sllm {
namespace {

const CudaApi& api(const std::string& cudart, const std::string& fallback) {
  try {
    return load_cuda(cudart, fallback);
  } catch (const std::exception& e) {
    throw EngineError(ErrorKind::Cuda, e.what());
  }
}

void check(const CudaApi& a, const char* call, cudaError_t rc) {
  if (rc == kCudaSuccess) return;
  a.GetLastError();
  throw EngineError(ErrorKind::Cuda, cuda_error_text(a, call, rc));
}

std::string bus_of(const CudaApi& a, int device) {
  char buf[32] = {};
  check(a, "cudaDeviceGetPCIBusId", need(a.DeviceGetPCIBusId, "cudaDeviceGetPCIBusId")(buf, sizeof buf, device));
  return buf;
}

}  // namespace

std::string runtime_path(const std::string& cudart, const std::string& fallback) {
  return api(cudart, fallback).path;
}

IpcExport ipc_export(uint64_t ptr, const std::string& cudart, const std::string& fallback) {
  const CudaApi& a = api(cudart, fallback);
  alignas(8) unsigned char attr[128] = {};  // cudaPointerAttributes: type, device, ...
  check(a, "cudaPointerGetAttributes", a.PointerGetAttributes(attr, reinterpret_cast<const void*>(ptr)));
  int type, device;
  std::memcpy(&type, attr, sizeof type);
  std::memcpy(&device, attr + sizeof type, sizeof device);
  if (type != kMemoryTypeDevice)
    throw EngineError(ErrorKind::Cuda, "address " + std::to_string(ptr) + " is not cudaMalloc device memory");
  int prev = 0;
  check(a, "cudaGetDevice", need(a.GetDevice, "cudaGetDevice")(&prev));
  // The driver call below uses the current context: make it the pointer's device's, then restore.
  if (prev != device) check(a, "cudaSetDevice", a.SetDevice(device));
  IpcExport out;
  out.device = device;
  try {
    size_t size = 0;
    int rc = driver_address_range(ptr, &out.base, &size);
    if (rc != 0) throw EngineError(ErrorKind::Cuda, "cuMemGetAddressRange: CUresult " + std::to_string(rc));
    out.size = size;
    IpcMemHandle h;
    check(a, "cudaIpcGetMemHandle", need(a.IpcGetMemHandle, "cudaIpcGetMemHandle")(&h, reinterpret_cast<void*>(out.base)));
    out.handle.assign(h.reserved, kIpcHandleBytes);
    out.bus = bus_of(a, device);
  } catch (...) {
    if (prev != device) a.SetDevice(prev);
    throw;
  }
  if (prev != device) check(a, "cudaSetDevice", a.SetDevice(prev));
  return out;
}

int device_by_bus(const std::string& bus, const std::string& cudart, const std::string& fallback) {
  const CudaApi& a = api(cudart, fallback);
  int dev = -1;
  check(a, "cudaDeviceGetByPCIBusId", need(a.DeviceGetByPCIBusId, "cudaDeviceGetByPCIBusId")(&dev, bus.c_str()));
  return dev;
}

}  // namespace sllm
