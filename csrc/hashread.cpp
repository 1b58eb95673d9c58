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

#include <dlfcn.h>
#include <sys/uio.h>

#include <cerrno>
#include <cstdint>

namespace {

// The xxh3 entry points (XXH3_state_t is opaque here: the library allocates it).
using CreateState = void* (*)();
using FreeState = int (*)(void*);
using Reset = int (*)(void*);
using Update = int (*)(void*, const void*, size_t);
using Digest = uint64_t (*)(const void*);

struct Xxh3 {
  CreateState create = nullptr;
  FreeState free = nullptr;
  Reset reset = nullptr;
  Update update = nullptr;
  Digest digest = nullptr;
};

Xxh3 g_xxh3;

template <typename F>
F symbol(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

PyObject* mod_bind(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  if (g_xxh3.update != nullptr) Py_RETURN_TRUE;  // bound once, for good: reads may be running on it
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);  // loaded already: this only takes a reference
  if (lib == nullptr) Py_RETURN_FALSE;
  Xxh3 x;
  x.create = symbol<CreateState>(lib, "XXH3_createState");
  x.free = symbol<FreeState>(lib, "XXH3_freeState");
  x.reset = symbol<Reset>(lib, "XXH3_64bits_reset");
  // xxhash's x86 dispatcher: the widest vectors this CPU has (the plain one is the build's baseline)
  x.update = symbol<Update>(lib, "XXH3_64bits_update_dispatch");
  if (x.update == nullptr) x.update = symbol<Update>(lib, "XXH3_64bits_update");
  x.digest = symbol<Digest>(lib, "XXH3_64bits_digest");
  if (!x.create || !x.free || !x.reset || !x.update || !x.digest) {
    dlclose(lib);
    Py_RETURN_FALSE;
  }
  g_xxh3 = x;  // under the GIL, once; the library stays open for the life of the process
  Py_RETURN_TRUE;
}

PyObject* mod_read(PyObject*, PyObject* args) {
  int fd = -1, flags = 0;
  Py_buffer dst;
  long long offset = 0;
  Py_ssize_t step = 0;
  if (!PyArg_ParseTuple(args, "iw*Lni", &fd, &dst, &offset, &step, &flags)) return nullptr;
  const Xxh3 x = g_xxh3;  // read under the GIL: the loop below runs without it
  if (x.update == nullptr || step <= 0 || offset < 0) {
    PyBuffer_Release(&dst);
    PyErr_SetString(PyExc_ValueError, x.update ? "step must be > 0, offset >= 0" : "bind() first");
    return nullptr;
  }
  void* state = x.create();
  if (state == nullptr) {
    PyBuffer_Release(&dst);
    return PyErr_NoMemory();
  }
  char* base = static_cast<char*>(dst.buf);
  const Py_ssize_t len = dst.len;
  Py_ssize_t done = 0;
  int err = 0;
  uint64_t digest = 0;
  Py_BEGIN_ALLOW_THREADS
  x.reset(state);
  while (done < len) {
    const Py_ssize_t want = step < len - done ? step : len - done;
    struct iovec iov = {base + done, static_cast<size_t>(want)};
    const ssize_t got = preadv2(fd, &iov, 1, offset + done, flags);
    if (got < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    x.update(state, base + done, static_cast<size_t>(got));  // still in L2: the read just wrote it
    done += got;
    if (got < want) break;  // the page cache ran out, or the file did
  }
  digest = x.digest(state);
  x.free(state);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&dst);
  return Py_BuildValue("nKi", done, static_cast<unsigned long long>(digest), err);
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
