// sllmfs._hashread: the fill's page-cache copy with its checksum, one call per 4 MiB window.
//
// bind(path) -> bool: find xxh3 in the library at ``path`` (python xxhash's own extension, already
//   loaded: the same code, the same runtime choice of vector width, so the same digests), else False.
// read(fd, dst, offset, step, flags) -> (done, digest, errno): preadv2 ``step``-byte reads with
//   ``flags`` (RWF_NOWAIT: only what the page cache holds) into the writable buffer ``dst`` from
//   ``offset`` on, each read hashed while it is still in the CPU's caches. Stops at the first short
//   read or error: ``done`` bytes landed, ``digest`` is the xxh3_64 of those ``done`` bytes, ``errno``
//   the error that stopped it (0: none, the read came up short or ``dst`` is full).
//
// read_direct(fd_direct, fd, dst, offset, depth) -> (done, digest, errno): the same for a window read
//   past the page cache: O_DIRECT reads of kDirectStep on ``fd_direct`` (``depth`` of them in flight,
//   Linux AIO, as the copy engine's stagers read; each hashed in file order as it lands) straight into
//   ``dst`` (4 KiB-aligned, as ``offset``), and the window's unaligned tail, if any (the file's end), by a
//   plain read of ``fd``, so nothing lands past ``dst``. ``errno`` EINVAL: an O_DIRECT read was refused
//   (the caller reads the window again the buffered way).
//
// Why native: in Python each read and each hash update is a trip through the GIL; with 16 fill
// threads those trips, not the copy, bounded the fill (bench/NOTES-cold.md run 11: 256 KiB reads
// ran at 0.34 of the copy, 1 MiB ones at 0.70-0.80). Here a window is one trip.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <new>
#include <stdexcept>

#include "direct_reads.h"
#include "xxh3.h"

namespace {

PyObject* mod_bind(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  if (sllm::bind_xxh3(path)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// Runs read(hash) without the GIL, releases dst (every read has landed by then), and answers
// (done, digest, errno).
template <typename Read>
PyObject* hashed_call(Py_buffer* dst, Read&& read) {
  sllm::HashedRead got;
  uint64_t digest = 0;
  bool no_memory = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    sllm::Xxh3 hash;
    got = read(hash);
    digest = hash.digest();
  } catch (const std::bad_alloc&) {
    no_memory = true;
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(dst);
  if (no_memory) return PyErr_NoMemory();
  return Py_BuildValue("nKi", static_cast<Py_ssize_t>(got.done), static_cast<unsigned long long>(digest), got.err);
}

PyObject* mod_read(PyObject*, PyObject* args) {
  int fd = -1, flags = 0;
  Py_buffer dst;
  long long offset = 0;
  Py_ssize_t step = 0;
  if (!PyArg_ParseTuple(args, "iw*Lni", &fd, &dst, &offset, &step, &flags)) return nullptr;
  if (!sllm::xxh3_bound() || step <= 0 || offset < 0) {
    PyBuffer_Release(&dst);
    PyErr_SetString(PyExc_ValueError, sllm::xxh3_bound() ? "step must be > 0, offset >= 0" : "bind() first");
    return nullptr;
  }
  return hashed_call(&dst, [&](sllm::Xxh3& hash) {
    return sllm::read_hashed(fd, static_cast<uint8_t*>(dst.buf), static_cast<uint64_t>(dst.len),
                             static_cast<uint64_t>(offset), static_cast<uint64_t>(step), flags, hash);
  });
}

// One AIO context per fill thread and depth, kept: io_setup/io_destroy cost ~33 ms (NOTES-cold run 26's review).
sllm::HashedRead direct_window(int fd_direct, int fd, uint8_t* dst, uint64_t len, uint64_t offset, int depth,
                               sllm::Xxh3& hash) {
  thread_local std::unique_ptr<sllm::DirectReads> reads;
  thread_local int reads_depth = 0;
  thread_local int no_aio_for = 0;  // windows to read one at a time before asking for a context again
  constexpr int kRetryAfter = 256;    // 1 GiB of windows
  const uint64_t aligned = len / sllm::kDirectAlign * sllm::kDirectAlign;
  sllm::HashedRead r;
  if (aligned > 0) {
    if (no_aio_for > 0) --no_aio_for;
    if (depth > 1 && no_aio_for == 0 && (!reads || reads_depth != depth)) {
      try {
        reads = std::make_unique<sllm::DirectReads>(depth);
        reads_depth = depth;
      } catch (const std::runtime_error&) {  // io_setup refused (fs.aio-max-nr reached, for now)
        reads.reset();
        no_aio_for = kRetryAfter;  // one read at a time meanwhile
      }
    }
    r = reads && depth > 1 ? reads->read(fd_direct, dst, aligned, offset, hash)
                           : sllm::read_direct(fd_direct, dst, aligned, offset, hash);
    if (r.err != 0 || r.done < aligned) return r;
  }
  while (r.done < len) {  // the unaligned tail: buffered, into dst's own bytes only
    const ssize_t got = pread(fd, dst + r.done, static_cast<size_t>(len - r.done), static_cast<off_t>(offset + r.done));
    if (got < 0) {
      if (errno == EINTR) continue;
      r.err = errno;
      break;
    }
    if (got == 0) break;
    hash.update(dst + r.done, static_cast<uint64_t>(got));
    r.done += static_cast<uint64_t>(got);
  }
  return r;
}

PyObject* mod_read_direct(PyObject*, PyObject* args) {
  int fd_direct = -1, fd = -1, depth = 1;
  Py_buffer dst;
  long long offset = 0;
  if (!PyArg_ParseTuple(args, "iiw*Li", &fd_direct, &fd, &dst, &offset, &depth)) return nullptr;
  const auto at = reinterpret_cast<uintptr_t>(dst.buf);
  if (!sllm::xxh3_bound() || offset < 0 || depth < 1 || depth > sllm::kMaxReadDepth || at % sllm::kDirectAlign ||
      static_cast<uint64_t>(offset) % sllm::kDirectAlign) {
    PyBuffer_Release(&dst);
    PyErr_SetString(PyExc_ValueError, sllm::xxh3_bound() ? "dst and offset must be 4 KiB-aligned, depth in range"
                                                         : "bind() first");
    return nullptr;
  }
  return hashed_call(&dst, [&](sllm::Xxh3& hash) {
    return direct_window(fd_direct, fd, static_cast<uint8_t*>(dst.buf), static_cast<uint64_t>(dst.len),
                         static_cast<uint64_t>(offset), depth, hash);
  });
}

PyMethodDef methods[] = {
    {"bind", mod_bind, METH_VARARGS, "bind(path) -> bool: use the xxh3 of the library at path"},
    {"read", mod_read, METH_VARARGS,
     "read(fd, dst, offset, step, flags) -> (done, xxh3_64 of those bytes, errno)"},
    {"read_direct", mod_read_direct, METH_VARARGS,
     "read_direct(fd_direct, fd, dst, offset, depth) -> (done, xxh3_64 of those bytes, errno)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashread", "hashed reads for the fill", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__hashread() {
  PyObject* m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "DIRECT_STEP", static_cast<long>(sllm::kDirectStep)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
