// Python binding of the copy engine (plain CPython API): sllmfs._native.
//
// Engine(target, device, mode, streams, threads, register_threads,
//        chunk_bytes, slot_bytes, slots_per_thread, cudart)
// Engine.copy(segments, pieces, timeout, progress, mode, relay) -> dict
// Engine.copy_ipc(segments, pieces, handles, buses, timeout, progress, mode, relay) -> (dict, [addr])
//   relay: None or {"peers": [ordinal], "slot_bytes", "slots", "direct_window"}; stats["relays"] says
//   what each peer carried or why it did not.  Engine.stop_relays(): from another thread, mid-copy.
// Engine.release(base, length, idle=False) -> int;  Engine.registered_bytes() -> int;  Engine.close()
// Engine.register(base, length) -> dict;  Engine.open_ipc(handle, bus) -> int;  Engine.close_ipc(addr)
// Engine.open_ipc_count() -> int;  Engine.bus_id() -> str
// runtime_path(cudart, fallback) -> str;  device_by_bus(bus, cudart, fallback) -> int
// ipc_export(ptr, cudart, fallback) -> (handle, base, size, device, bus)
// CHUNK_PENDING, CHUNK_READY, CHUNK_FAILED: the readiness values the copy reads (engine.h).
// Errors raise _native.EngineError(kind, message); sllmfs.engine.native maps kinds to classes.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>

#include <cstring>
#include <string>
#include <vector>

#include "engine.h"
#include "errors.h"
#include "ipc.h"
#include "xxh3.h"

namespace {

PyObject* g_error = nullptr;

const char* kind_name(sllm::ErrorKind k) {
  switch (k) {
    case sllm::ErrorKind::Cuda: return "cuda";
    case sllm::ErrorKind::ChunkFailed: return "chunk_failed";
    case sllm::ErrorKind::Timeout: return "timeout";
    case sllm::ErrorKind::BadPlan: return "bad_plan";
    case sllm::ErrorKind::Aborted: return "aborted";
    case sllm::ErrorKind::Corrupt: return "corrupt";
    case sllm::ErrorKind::Io: return "io";
    default: return "runtime";
  }
}

void raise(const sllm::EngineError& e) {
  PyObject* args = Py_BuildValue("(ss)", kind_name(e.kind), e.what());
  if (args) {
    PyErr_SetObject(g_error, args);
    Py_DECREF(args);
  }
}

// Runs `fn` without the GIL; EngineError and std::exception become _native.EngineError.
template <typename F>
bool run_nogil(F&& fn) {
  bool failed = false;
  sllm::EngineError err(sllm::ErrorKind::Runtime, "");
  Py_BEGIN_ALLOW_THREADS;
  try {
    fn();
  } catch (const sllm::EngineError& e) {
    err = e;
    failed = true;
  } catch (const std::exception& e) {
    err = sllm::EngineError(sllm::ErrorKind::Runtime, e.what());
    failed = true;
  }
  Py_END_ALLOW_THREADS;
  if (failed) raise(err);
  return !failed;
}

bool parse_mode(const std::string& m, sllm::Mode* out) {
  if (m == "register") *out = sllm::Mode::Register;
  else if (m == "stage") *out = sllm::Mode::Stage;
  else if (m == "hybrid") *out = sllm::Mode::Hybrid;
  else {
    PyErr_SetString(PyExc_ValueError, "mode must be 'register', 'stage' or 'hybrid'");
    return false;
  }
  return true;
}

struct EngineObject {
  PyObject_HEAD
  sllm::Engine* engine;
};

int engine_init(EngineObject* self, PyObject* args, PyObject* kwds) {
  static const char* kw[] = {"target", "device", "mode", "streams", "threads", "register_threads",
                             "chunk_bytes", "slot_bytes", "slots_per_thread", "cudart", "cudart_fallback",
                             "file_block_bytes", "read_depth", "read_overlap", nullptr};
  const char* target = "host";
  const char* mode = "hybrid";
  const char* cudart = "";
  const char* fallback = "";
  sllm::EngineConfig cfg;
  unsigned long long chunk = cfg.chunk_bytes, slot = cfg.slot_bytes, file_block = cfg.file_block_bytes;
  unsigned long long overlap = cfg.read_overlap;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "|sisiiiKKissKiK", const_cast<char**>(kw), &target, &cfg.device, &mode,
                                   &cfg.streams, &cfg.stage_threads, &cfg.register_threads, &chunk, &slot,
                                   &cfg.slots_per_thread, &cudart, &fallback, &file_block, &cfg.read_depth, &overlap))
    return -1;
  std::string t(target), m(mode);
  if (t != "host" && t != "cuda") {
    PyErr_SetString(PyExc_ValueError, "target must be 'cuda' or 'host'");
    return -1;
  }
  if (!parse_mode(mode, &cfg.mode)) return -1;
  cfg.cuda = t == "cuda";
  cfg.cudart = cudart;
  cfg.cudart_fallback = fallback;
  cfg.chunk_bytes = chunk;
  cfg.slot_bytes = slot;
  cfg.file_block_bytes = file_block;
  if (overlap % sllm::kDirectAlign || overlap > sllm::kMaxReadOverlap) {
    PyErr_Format(PyExc_ValueError, "read_overlap must be a multiple of %llu, at most %llu",
                 static_cast<unsigned long long>(sllm::kDirectAlign),
                 static_cast<unsigned long long>(sllm::kMaxReadOverlap));
    return -1;
  }
  cfg.read_overlap = overlap;
  if (cfg.read_depth < 1 || cfg.read_depth > sllm::kMaxReadDepth) {
    PyErr_Format(PyExc_ValueError, "read_depth must be 1-%d", sllm::kMaxReadDepth);
    return -1;
  }
  delete self->engine;
  self->engine = nullptr;
  sllm::Engine* eng = nullptr;
  bool failed = false;
  sllm::EngineError err(sllm::ErrorKind::Runtime, "");
  Py_BEGIN_ALLOW_THREADS;  // loading CUDA and creating streams can take a while
  try {
    eng = new sllm::Engine(cfg);
  } catch (const sllm::EngineError& e) {
    err = e;
    failed = true;
  } catch (const std::exception& e) {
    err = sllm::EngineError(sllm::ErrorKind::Runtime, e.what());
    failed = true;
  }
  Py_END_ALLOW_THREADS;
  if (failed) {
    raise(err);
    return -1;
  }
  self->engine = eng;
  return 0;
}

void engine_dealloc(EngineObject* self) {
  if (self->engine) {
    Py_BEGIN_ALLOW_THREADS;
    delete self->engine;
    Py_END_ALLOW_THREADS;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool need_engine(EngineObject* self) {
  if (self->engine) return true;
  PyErr_SetString(PyExc_RuntimeError, "engine is not initialized");
  return false;
}

// Each segment: (base, length, ready, chunk_size) for a mapping, or
// (0, length, 0, 0, fd, digests address, window, name[, tee address, teed address]) for a file source
// (csrc/plan.h).
bool parse_segments(PyObject* obj, std::vector<sllm::SegmentDesc>* out) {
  PyObject* seq = PySequence_Fast(obj, "segments must be a sequence of (base, length, ready, chunk_size)");
  if (!seq) return false;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    unsigned long long base, len, ready, chunk, digests = 0, window = 0, tee = 0, teed = 0;
    int fd = -1;
    const char* name = "";
    const Py_ssize_t size = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
    bool ok = size == 10 ? PyArg_ParseTuple(item, "KKKKiKKsKK", &base, &len, &ready, &chunk, &fd, &digests, &window,
                                            &name, &tee, &teed)
              : size == 8 ? PyArg_ParseTuple(item, "KKKKiKKs", &base, &len, &ready, &chunk, &fd, &digests, &window, &name)
                          : PyArg_ParseTuple(item, "KKKK", &base, &len, &ready, &chunk);
    if (ok && (tee == 0) != (teed == 0)) {
      PyErr_SetString(PyExc_ValueError, "a file segment's tee and teed addresses come together");
      ok = false;
    }
    if (!ok) {
      Py_DECREF(seq);
      return false;
    }
    sllm::SegmentDesc d{reinterpret_cast<const uint8_t*>(base), len, reinterpret_cast<const uint8_t*>(ready), chunk};
    d.fd = fd;
    d.digests = reinterpret_cast<const uint64_t*>(digests);
    d.window = window;
    d.name = name;
    d.tee = reinterpret_cast<uint8_t*>(tee);
    d.teed = reinterpret_cast<uint8_t*>(teed);
    if (fd >= 0) {
      const int flags = fcntl(fd, F_GETFL);
      d.direct = flags >= 0 && (flags & O_DIRECT) != 0;
    }
    out->push_back(d);
  }
  Py_DECREF(seq);
  return true;
}

// None, or {"peers": [int], "slot_bytes": int, "slots": int, "direct_window": int} (any key may be left out).
bool parse_relay(PyObject* obj, sllm::RelayConfig* out, bool* given) {
  *given = obj && obj != Py_None;
  if (!*given) return true;
  if (!PyDict_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "relay must be a dict (peers, slot_bytes, slots, direct_window) or None");
    return false;
  }
  if (PyObject* peers = PyDict_GetItemString(obj, "peers")) {
    PyObject* seq = PySequence_Fast(peers, "relay peers must be a sequence of device ordinals");
    if (!seq) return false;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
      long d = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
      if (d == -1 && PyErr_Occurred()) {
        Py_DECREF(seq);
        return false;
      }
      out->peers.push_back(static_cast<int>(d));
    }
    Py_DECREF(seq);
  }
  struct {
    const char* key;
    uint64_t* to;
  } sizes[] = {{"slot_bytes", &out->slot_bytes}, {"direct_window", &out->direct_window}};
  for (auto& [key, to] : sizes)
    if (PyObject* v = PyDict_GetItemString(obj, key)) {
      *to = PyLong_AsUnsignedLongLong(v);
      if (PyErr_Occurred()) return false;
    }
  if (PyObject* v = PyDict_GetItemString(obj, "slots")) {
    out->slots = static_cast<int>(PyLong_AsLong(v));
    if (PyErr_Occurred()) return false;
  }
  return true;
}

PyObject* relays_list(const std::vector<sllm::RelayStats>& relays) {
  PyObject* out = PyList_New(0);
  for (const sllm::RelayStats& r : relays) {
    PyObject* d = out ? Py_BuildValue("{s:i,s:K,s:K,s:d,s:s}", "peer", r.peer, "bytes", (unsigned long long)r.bytes,
                                      "staging_bytes", (unsigned long long)r.staging_bytes, "busy_seconds",
                                      r.busy_seconds, "skipped", r.skipped.c_str())
                      : nullptr;
    if (!d || PyList_Append(out, d) < 0) {
      Py_XDECREF(d);
      Py_XDECREF(out);
      return nullptr;
    }
    Py_DECREF(d);
  }
  return out;
}

PyObject* stats_dict(const sllm::CopyStats& s) {
  double gbps = s.seconds > 0 ? s.bytes / s.seconds / 1e9 : 0.0;
  PyObject* relays = relays_list(s.relays);
  if (!relays) return nullptr;
  return Py_BuildValue(
      "{s:K,s:d,s:d,s:K,s:K,s:K,s:d,s:K,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:K,s:K,s:s,s:N}", "bytes",
      (unsigned long long)s.bytes, "seconds",
      s.seconds, "gbps", gbps, "staged_bytes", (unsigned long long)s.staged_bytes, "registered_bytes",
      (unsigned long long)s.registered_bytes, "newly_registered_bytes", (unsigned long long)s.newly_registered_bytes,
      "register_seconds", s.register_seconds, "register_calls", (unsigned long long)s.register_calls,
      "ring_alloc_seconds", s.ring_alloc_seconds, "first_ready_seconds", s.first_ready_seconds,
      "last_ready_seconds", s.last_ready_seconds, "pin_start_seconds", s.pin_start_seconds, "pin_end_seconds",
      s.pin_end_seconds, "last_queued_seconds", s.last_queued_seconds, "stage_fill_seconds", s.stage_fill_seconds,
      "stage_wait_seconds", s.stage_wait_seconds, "blocks",
      (unsigned long long)s.blocks, "units", (unsigned long long)s.units, "register_fallback",
      s.register_fallback.c_str(), "relays", relays);
}

// Shared by copy and copy_ipc: pieces are rows of 4 uint64, or of 5 with an
// IPC destination (segment, offset, block, offset in block, nbytes).
PyObject* run_copy(EngineObject* self, PyObject* segs_obj, PyObject* pieces_obj, double timeout, PyObject* progress,
                   const char* mode_name, sllm::IpcDests* ipc, PyObject* relay_obj) {
  if (!need_engine(self)) return nullptr;
  sllm::RelayConfig relay;
  bool relaying = false;
  if (!parse_relay(relay_obj, &relay, &relaying)) return nullptr;
  sllm::Mode mode = self->engine->mode();
  if (mode_name && !parse_mode(mode_name, &mode)) return nullptr;
  std::vector<sllm::SegmentDesc> segs;
  if (!parse_segments(segs_obj, &segs)) return nullptr;
  const Py_ssize_t row = ipc ? 40 : 32;
  Py_buffer view;
  if (PyObject_GetBuffer(pieces_obj, &view, PyBUF_C_CONTIGUOUS) < 0) return nullptr;
  if (view.len % row != 0) {
    PyBuffer_Release(&view);
    PyErr_SetString(PyExc_ValueError, ipc ? "pieces must be rows of 5 uint64 (segment, offset, block, offset, nbytes)"
                                          : "pieces must be rows of 4 uint64 (segment, offset, dst, nbytes)");
    return nullptr;
  }
  size_t n = static_cast<size_t>(view.len / row);
  // Own copies: the caller's array may be freed or changed meanwhile.
  std::vector<uint64_t> rows(n * 4);
  std::vector<uint32_t> dest_blocks;
  const auto* in = static_cast<const uint64_t*>(view.buf);
  if (!ipc) {
    if (n) std::memcpy(rows.data(), view.buf, view.len);
  } else {
    dest_blocks.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t* r = in + 5 * i;
      rows[4 * i] = r[0];
      rows[4 * i + 1] = r[1];
      rows[4 * i + 2] = r[3];
      rows[4 * i + 3] = r[4];
      dest_blocks[i] = r[2] >= sllm::kNoDestBlock ? sllm::kNoDestBlock - 1 : static_cast<uint32_t>(r[2]);
    }
  }
  PyBuffer_Release(&view);

  PyThreadState* ts = nullptr;
  PyObject* cb_exc_type = nullptr;
  PyObject* cb_exc = nullptr;
  PyObject* cb_tb = nullptr;
  // Runs in this thread with the GIL released; takes it back briefly for the
  // callback and for Ctrl-C.
  sllm::Tick tick = [&](uint64_t done, uint64_t total) -> bool {
    PyEval_RestoreThread(ts);
    bool ok = PyErr_CheckSignals() == 0;
    if (ok && progress != Py_None) {
      PyObject* r = PyObject_CallFunction(progress, "KK", (unsigned long long)done, (unsigned long long)total);
      ok = r != nullptr;
      Py_XDECREF(r);
    }
    if (!ok && !cb_exc_type) PyErr_Fetch(&cb_exc_type, &cb_exc, &cb_tb);
    ts = PyEval_SaveThread();
    return ok;
  };
  sllm::CopyStats st;
  bool failed = false;
  sllm::EngineError err(sllm::ErrorKind::Runtime, "");
  ts = PyEval_SaveThread();
  try {
    st = self->engine->copy(segs, rows.data(), n, timeout, tick, mode, ipc, ipc ? dest_blocks.data() : nullptr,
                            relaying ? &relay : nullptr);
  } catch (const sllm::EngineError& e) {
    err = e;
    failed = true;
  } catch (const std::exception& e) {
    err = sllm::EngineError(sllm::ErrorKind::Runtime, e.what());
    failed = true;
  }
  PyEval_RestoreThread(ts);
  if (cb_exc_type) {
    PyErr_Restore(cb_exc_type, cb_exc, cb_tb);
    return nullptr;
  }
  if (failed) {
    raise(err);
    return nullptr;
  }
  return stats_dict(st);
}

PyObject* engine_copy(EngineObject* self, PyObject* args, PyObject* kwds) {
  static const char* kw[] = {"segments", "pieces", "timeout", "progress", "mode", "relay", nullptr};
  PyObject *segs_obj, *pieces_obj, *progress = Py_None, *relay = Py_None;
  double timeout = -1;
  const char* mode_name = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|dOzO", const_cast<char**>(kw), &segs_obj, &pieces_obj, &timeout,
                                   &progress, &mode_name, &relay))
    return nullptr;
  return run_copy(self, segs_obj, pieces_obj, timeout, progress, mode_name, nullptr, relay);
}

PyObject* engine_copy_ipc(EngineObject* self, PyObject* args, PyObject* kwds) {
  static const char* kw[] = {"segments", "pieces", "handles", "buses", "timeout", "progress", "mode", "relay", nullptr};
  PyObject *segs_obj, *pieces_obj, *handles_obj, *buses_obj, *progress = Py_None, *relay = Py_None;
  double timeout = -1;
  const char* mode_name = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|dOzO", const_cast<char**>(kw), &segs_obj, &pieces_obj,
                                   &handles_obj, &buses_obj, &timeout, &progress, &mode_name, &relay))
    return nullptr;
  sllm::IpcDests ipc;
  PyObject* hs = PySequence_Fast(handles_obj, "handles must be a sequence of 64-byte bytes");
  if (!hs) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(hs); ++i) {
    char* buf;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(hs, i), &buf, &len) < 0 || len != 64) {
      Py_DECREF(hs);
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a CUDA IPC handle is 64 bytes");
      return nullptr;
    }
    ipc.handles.emplace_back(buf, static_cast<size_t>(len));
  }
  Py_DECREF(hs);
  PyObject* bs = PySequence_Fast(buses_obj, "buses must be a sequence of str");
  if (!bs) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(bs); ++i) {
    const char* b = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(bs, i));
    if (!b) {
      Py_DECREF(bs);
      return nullptr;
    }
    ipc.buses.emplace_back(b);
  }
  Py_DECREF(bs);
  PyObject* stats = run_copy(self, segs_obj, pieces_obj, timeout, progress, mode_name, &ipc, relay);
  PyObject* addrs = stats ? PyList_New(0) : nullptr;
  bool ok = addrs != nullptr;
  for (uintptr_t a : ipc.opened) {
    if (!a || !ok) continue;
    PyObject* v = PyLong_FromUnsignedLongLong(a);
    ok = v && PyList_Append(addrs, v) == 0;
    Py_XDECREF(v);
  }
  PyObject* secs = ok ? PyFloat_FromDouble(ipc.open_seconds) : nullptr;
  ok = ok && secs && PyDict_SetItemString(stats, "ipc_open_s", secs) == 0;
  Py_XDECREF(secs);
  if (!ok) {  // the copy landed but we cannot hand the handles back: close them here
    if (stats) {
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      for (uintptr_t a : ipc.opened)
        if (a) run_nogil([&] { self->engine->close_ipc(a); });
      PyErr_Restore(t, v, tb);
    }
    Py_XDECREF(stats);
    Py_XDECREF(addrs);
    return nullptr;
  }
  return Py_BuildValue("(NN)", stats, addrs);
}

PyObject* engine_release(EngineObject* self, PyObject* args) {
  unsigned long long base, len;
  int idle = 0;
  if (!PyArg_ParseTuple(args, "KK|p", &base, &len, &idle)) return nullptr;
  if (!need_engine(self)) return nullptr;
  size_t n;
  Py_BEGIN_ALLOW_THREADS;
  n = self->engine->release(base, len, idle != 0);
  Py_END_ALLOW_THREADS;
  return PyLong_FromSize_t(n);
}

PyObject* engine_registered_bytes(EngineObject* self, PyObject*) {
  if (!need_engine(self)) return nullptr;
  return PyLong_FromUnsignedLongLong(self->engine->registered_bytes());
}

PyObject* engine_prepare_ring(EngineObject* self, PyObject*) {
  if (!need_engine(self)) return nullptr;
  double seconds = 0;
  if (!run_nogil([&] { seconds = self->engine->prepare_ring(); })) return nullptr;
  return PyFloat_FromDouble(seconds);
}

PyObject* engine_close(EngineObject* self, PyObject*) {
  if (self->engine) {
    Py_BEGIN_ALLOW_THREADS;
    self->engine->close();
    Py_END_ALLOW_THREADS;
  }
  Py_RETURN_NONE;
}

PyObject* engine_register(EngineObject* self, PyObject* args) {
  unsigned long long base, len;
  if (!PyArg_ParseTuple(args, "KK", &base, &len)) return nullptr;
  if (!need_engine(self)) return nullptr;
  sllm::Registered r;
  if (!run_nogil([&] { r = self->engine->register_segment(base, len); })) return nullptr;
  return Py_BuildValue("{s:K,s:d,s:O}", "bytes", (unsigned long long)r.bytes, "seconds", r.seconds, "cached",
                       r.cached ? Py_True : Py_False);
}

PyObject* engine_open_ipc(EngineObject* self, PyObject* args) {
  Py_buffer h;
  const char* bus;
  if (!PyArg_ParseTuple(args, "y*s", &h, &bus)) return nullptr;
  std::string handle(static_cast<const char*>(h.buf), static_cast<size_t>(h.len));
  PyBuffer_Release(&h);
  if (handle.size() != 64) {
    PyErr_SetString(PyExc_ValueError, "a CUDA IPC handle is 64 bytes");
    return nullptr;
  }
  if (!need_engine(self)) return nullptr;
  std::string b(bus);
  uintptr_t addr = 0;
  if (!run_nogil([&] { addr = self->engine->open_ipc(handle.data(), b); })) return nullptr;
  return PyLong_FromUnsignedLongLong(addr);
}

PyObject* engine_close_ipc(EngineObject* self, PyObject* args) {
  unsigned long long addr;
  if (!PyArg_ParseTuple(args, "K", &addr)) return nullptr;
  if (!need_engine(self)) return nullptr;
  if (!run_nogil([&] { self->engine->close_ipc(addr); })) return nullptr;
  Py_RETURN_NONE;
}

PyObject* engine_stop_relays(EngineObject* self, PyObject*) {
  if (!need_engine(self)) return nullptr;
  self->engine->stop_relays();  // an atomic flag: never waits on the running copy
  Py_RETURN_NONE;
}

PyObject* engine_open_ipc_count(EngineObject* self, PyObject*) {
  if (!need_engine(self)) return nullptr;
  return PyLong_FromSize_t(self->engine->open_ipc_count());
}

PyObject* engine_bus_id(EngineObject* self, PyObject*) {
  if (!need_engine(self)) return nullptr;
  std::string bus;
  if (!run_nogil([&] { bus = self->engine->bus_id(); })) return nullptr;
  return PyUnicode_FromString(bus.c_str());
}

PyObject* mod_runtime_path(PyObject*, PyObject* args) {
  const char *cudart = "", *fallback = "";
  if (!PyArg_ParseTuple(args, "|ss", &cudart, &fallback)) return nullptr;
  std::string c(cudart), f(fallback), path;
  if (!run_nogil([&] { path = sllm::runtime_path(c, f); })) return nullptr;
  return PyUnicode_FromString(path.c_str());
}

PyObject* mod_device_by_bus(PyObject*, PyObject* args) {
  const char *bus, *cudart = "", *fallback = "";
  if (!PyArg_ParseTuple(args, "s|ss", &bus, &cudart, &fallback)) return nullptr;
  std::string b(bus), c(cudart), f(fallback);
  int dev = -1;
  if (!run_nogil([&] { dev = sllm::device_by_bus(b, c, f); })) return nullptr;
  return PyLong_FromLong(dev);
}

PyObject* mod_ipc_export(PyObject*, PyObject* args) {
  unsigned long long ptr;
  const char *cudart = "", *fallback = "";
  if (!PyArg_ParseTuple(args, "K|ss", &ptr, &cudart, &fallback)) return nullptr;
  std::string c(cudart), f(fallback);
  sllm::IpcExport e;
  if (!run_nogil([&] { e = sllm::ipc_export(ptr, c, f); })) return nullptr;
  return Py_BuildValue("(y#KKis)", e.handle.data(), (Py_ssize_t)e.handle.size(), (unsigned long long)e.base,
                       (unsigned long long)e.size, e.device, e.bus.c_str());
}

PyObject* mod_bind_xxh3(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  if (sllm::bind_xxh3(path)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef module_methods[] = {
    {"bind_xxh3", mod_bind_xxh3, METH_VARARGS,
     "bind_xxh3(path) -> bool: checksum file sources with the xxh3 of the library at path (python xxhash's)"},
    {"runtime_path", mod_runtime_path, METH_VARARGS, "runtime_path(cudart='', fallback='') -> path of the runtime"},
    {"device_by_bus", mod_device_by_bus, METH_VARARGS, "device_by_bus(bus, cudart='', fallback='') -> ordinal"},
    {"ipc_export", mod_ipc_export, METH_VARARGS,
     "ipc_export(ptr, cudart='', fallback='') -> (handle, base, size, device, bus) of ptr's allocation"},
    {nullptr, nullptr, 0, nullptr}};

PyMethodDef engine_methods[] = {
    {"copy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_copy)),
     METH_VARARGS | METH_KEYWORDS, "copy(segments, pieces, timeout=-1, progress=None, mode=None) -> stats dict"},
    {"release", reinterpret_cast<PyCFunction>(engine_release), METH_VARARGS,
     "release(base, length, idle=False) -> number of cached registrations dropped (idle: do not wait for a "
     "running copy; only for memory no copy reads)"},
    {"registered_bytes", reinterpret_cast<PyCFunction>(engine_registered_bytes), METH_NOARGS,
     "bytes currently pinned in place (cached registrations)"},
    {"close", reinterpret_cast<PyCFunction>(engine_close), METH_NOARGS, "synchronize, unpin, free the ring"},
    {"prepare_ring", reinterpret_cast<PyCFunction>(engine_prepare_ring), METH_NOARGS,
     "prepare_ring() -> seconds: allocate every staging slot now rather than during the first copies"},
    {"register", reinterpret_cast<PyCFunction>(engine_register), METH_VARARGS,
     "register(base, length) -> {bytes, seconds, cached}: pin a whole segment now, cached"},
    {"copy_ipc", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(engine_copy_ipc)),
     METH_VARARGS | METH_KEYWORDS,
     "copy_ipc(segments, pieces, handles, buses, timeout, progress, mode) -> (stats, opened addresses):"
     " pieces are (segment, offset, block, offset in block, nbytes) rows; handles open while the copy runs"},
    {"open_ipc", reinterpret_cast<PyCFunction>(engine_open_ipc), METH_VARARGS,
     "open_ipc(handle, bus) -> device address of another process's allocation"},
    {"close_ipc", reinterpret_cast<PyCFunction>(engine_close_ipc), METH_VARARGS, "close_ipc(addr)"},
    {"stop_relays", reinterpret_cast<PyCFunction>(engine_stop_relays), METH_NOARGS,
     "the running copy's relays finish their block and stop (another load wants a relaying GPU)"},
    {"open_ipc_count", reinterpret_cast<PyCFunction>(engine_open_ipc_count), METH_NOARGS, "IPC handles open"},
    {"bus_id", reinterpret_cast<PyCFunction>(engine_bus_id), METH_NOARGS, "PCI bus id of the engine's device"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject EngineType = {PyVarObject_HEAD_INIT(nullptr, 0)};

struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_native", "sllmfs native copy engine", -1, module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
  EngineType.tp_name = "sllmfs._native.Engine";
  EngineType.tp_basicsize = sizeof(EngineObject);
  EngineType.tp_flags = Py_TPFLAGS_DEFAULT;
  EngineType.tp_doc = "Native copy engine (see sllmfs.engine.copy_engine.CopyEngine)";
  EngineType.tp_new = PyType_GenericNew;
  EngineType.tp_init = reinterpret_cast<initproc>(engine_init);
  EngineType.tp_dealloc = reinterpret_cast<destructor>(engine_dealloc);
  EngineType.tp_methods = engine_methods;
  if (PyType_Ready(&EngineType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&moduledef);
  if (!m) return nullptr;
  g_error = PyErr_NewException("sllmfs._native.EngineError", nullptr, nullptr);
  Py_INCREF(&EngineType);
  if (!g_error || PyModule_AddObject(m, "Engine", reinterpret_cast<PyObject*>(&EngineType)) < 0 ||
      PyModule_AddObject(m, "EngineError", g_error) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_INCREF(g_error);
  if (PyModule_AddIntConstant(m, "READ_DEPTH_MAX", sllm::kMaxReadDepth) < 0 ||
      PyModule_AddIntConstant(m, "READ_OVERLAP_MAX", static_cast<long>(sllm::kMaxReadOverlap)) < 0 ||
      PyModule_AddIntConstant(m, "READ_ALIGN", static_cast<long>(sllm::kDirectAlign)) < 0 ||
      PyModule_AddIntConstant(m, "CHUNK_PENDING", sllm::kChunkPending) < 0 ||
      PyModule_AddIntConstant(m, "CHUNK_READY", sllm::kChunkReady) < 0 ||
      PyModule_AddIntConstant(m, "CHUNK_FAILED", sllm::kChunkFailed) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
