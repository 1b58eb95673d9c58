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
// Why native: in Python each read and each hash update is a trip through the GIL; with 16 fill
// threads those trips, not the copy, bounded the fill (bench/NOTES-cold.md run 11: 256 KiB reads
// ran at 0.34 of the copy, 1 MiB ones at 0.70-0.80). Here a window is one trip.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <new>

#include "xxh3.h"

namespace {

PyObject* mod_bind(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  if (sllm::bind_xxh3(path)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
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
  sllm::HashedRead got;
  uint64_t digest = 0;
  bool no_memory = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    sllm::Xxh3 hash;
    got = sllm::read_hashed(fd, static_cast<uint8_t*>(dst.buf), static_cast<uint64_t>(dst.len),
                            static_cast<uint64_t>(offset), static_cast<uint64_t>(step), flags, hash);
    digest = hash.digest();
  } catch (const std::bad_alloc&) {
    no_memory = true;
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&dst);
  if (no_memory) return PyErr_NoMemory();
  return Py_BuildValue("nKi", static_cast<Py_ssize_t>(got.done), static_cast<unsigned long long>(digest), got.err);
}

PyMethodDef methods[] = {
    {"bind", mod_bind, METH_VARARGS, "bind(path) -> bool: use the xxh3 of the library at path"},
    {"read", mod_read, METH_VARARGS,
     "read(fd, dst, offset, step, flags) -> (done, xxh3_64 of those bytes, errno)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hashread", "hashed reads for the fill", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__hashread() { return PyModule_Create(&module); }
