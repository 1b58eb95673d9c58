// Errors the engine raises; the binding maps each kind to a Python exception.
#pragma once

#include <stdexcept>
#include <string>

namespace sllm {

// Corrupt: a file source's bytes differ from their checksum; Io: reading a file source failed.
enum class ErrorKind { Cuda, ChunkFailed, Timeout, BadPlan, Aborted, Runtime, Corrupt, Io };

struct EngineError : std::runtime_error {
  ErrorKind kind;
  EngineError(ErrorKind k, const std::string& msg) : std::runtime_error(msg), kind(k) {}
};

}  // namespace sllm
