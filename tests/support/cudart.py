"""A fake CUDA runtime to compile for tests of the server-side copy on a machine without a GPU."""

# A stand-in libcudart: host memory plays the GPU, an IPC handle carries a host address.
FAKE_IPC_CUDART = r"""
#include <stdlib.h>
#include <string.h>
typedef int E;
typedef struct { char r[64]; } H;  /* cudaIpcMemHandle_t, passed by value */
static int opened = 0;
E cudaSetDevice(int d) { return d < 2 ? 0 : 101; }
E cudaGetDevice(int* d) { *d = 0; return 0; }
E cudaGetDeviceCount(int* c) { *c = 2; return 0; }
E cudaDeviceSynchronize(void) { return 0; }
E cudaStreamCreateWithFlags(void** s, unsigned f) { *s = malloc(1); return 0; }
E cudaStreamDestroy(void* s) { free(s); return 0; }
E cudaStreamSynchronize(void* s) { return 0; }
E cudaEventCreateWithFlags(void** e, unsigned f) { *e = malloc(1); return 0; }
E cudaEventDestroy(void* e) { free(e); return 0; }
E cudaEventRecord(void* e, void* s) { return 0; }
E cudaEventSynchronize(void* e) { return 0; }
E cudaEventQuery(void* e) { return 0; }
E cudaMemcpyAsync(void* d, const void* s, size_t n, int k, void* st) { memcpy(d, s, n); return 0; }
E cudaHostRegister(void* p, size_t n, unsigned f) { return 0; }
E cudaHostUnregister(void* p) { return 0; }
E cudaHostAlloc(void** p, size_t n, unsigned f) { *p = malloc(n); return 0; }
E cudaFreeHost(void* p) { free(p); return 0; }
E cudaGetLastError(void) { return 0; }
const char* cudaGetErrorName(E e) {
  return e == 101 ? "cudaErrorInvalidDevice" : e == 400 ? "cudaErrorInvalidResourceHandle" : "cudaErrorUnknown";
}
const char* cudaGetErrorString(E e) { return "fake"; }
E cudaRuntimeGetVersion(int* v) { *v = 13000; return 0; }
E cudaPointerGetAttributes(void* a, const void* p) { memset(a, 0, 16); return 0; }
E cudaIpcOpenMemHandle(void** p, H h, unsigned f) {
  if (f != 1) return 1;  /* cudaIpcMemLazyEnablePeerAccess */
  if (h.r[63] == 1) return 400;  /* a handle marked bad: cudaErrorInvalidResourceHandle */
  memcpy(p, h.r, sizeof(void*));
  ++opened;
  return 0;
}
E cudaIpcCloseMemHandle(void* p) { --opened; return 0; }
E cudaDeviceGetByPCIBusId(int* d, const char* bus) {
  if (!strcmp(bus, "0000:00:06.0")) { *d = 0; return 0; }
  if (!strcmp(bus, "0000:00:07.0")) { *d = 1; return 0; }
  return 101;
}
E cudaDeviceGetPCIBusId(char* buf, int n, int d) { strncpy(buf, d ? "0000:00:07.0" : "0000:00:06.0", n); return 0; }
int fake_open_handles(void) { return opened; }
"""
