// Engine-free CUDA helpers for both sides of a server-side copy: the client
// exports its allocations as IPC handles, the sidecar maps PCI bus ids to its
// own device ordinals (CUDA_VISIBLE_DEVICES may differ between the two).
#pragma once

#include <cstdint>
#include <string>

namespace sllm {

struct IpcExport {
  std::string handle;  // 64 bytes, cudaIpcMemHandle_t of the whole cudaMalloc allocation
  uint64_t base = 0;   // that allocation's first byte, in the exporting process
  uint64_t size = 0;
  int device = -1;
  std::string bus;     // PCI bus id of its device
};

// All throw EngineError(Cuda) with one line.
std::string runtime_path(const std::string& cudart, const std::string& fallback);
IpcExport ipc_export(uint64_t ptr, const std::string& cudart, const std::string& fallback);
int device_by_bus(const std::string& bus, const std::string& cudart, const std::string& fallback);

}  // namespace sllm
