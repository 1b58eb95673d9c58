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

# A stand-in libcudart with GPUs that have peers, for the relay tests (issue 26).
# Host memory plays every GPU, but copies are ASYNCHRONOUS as on a GPU: each stream
# is a thread running its queue in order with random delays, an event completes when
# its stream reaches it, cudaFree/cudaFreeHost poison what they free. So a copy that
# reuses a staging slot before its last copy out landed, or returns before every
# stream drained, shows up as wrong bytes. FAKE_CUDA_DEVICES (default 2) GPUs; pairs
# in FAKE_CUDA_NO_PEER ("0-1,0-2") have no peer access; FAKE_CUDA_MALLOC_LIMIT bytes
# per GPU (default unlimited); FAKE_CUDA_PEER_FAIL_AFTER=N fails every peer copy after the first N.
# fake_peer_bytes(dev) counts bytes that left dev by
# peer copies, fake_h2d_bytes(dev) bytes uploaded by streams of dev,
# fake_device_peak(dev) the most device memory dev held at once, fake_device_now(dev); host
# registrations follow the driver's rules (below), fake_bad_copies() counts copies they refused,
# fake_pins() the registrations (and cudaHostAlloc blocks) alive.
FAKE_PEER_CUDART = r"""
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
typedef int E;
typedef struct { char r[64]; } H;
enum { MAXDEV = 8 };
static __thread int cur = 0;
static int ndev(void) { const char* s = getenv("FAKE_CUDA_DEVICES"); return s ? atoi(s) : 2; }
static pthread_mutex_t g = PTHREAD_MUTEX_INITIALIZER;
static long long peer_out[MAXDEV], h2d[MAXDEV], dev_now[MAXDEV], dev_peak[MAXDEV];
static int enabled[MAXDEV][MAXDEV];
static unsigned seed = 7;
/* Page-locked host memory as the driver keeps it: a process-wide table of registrations (and
   cudaHostAlloc allocations). Registering any page already in one is 712; unregistering needs the
   exact start; an H2D copy whose source is neither wholly inside one registration nor wholly
   outside all of them is cudaErrorInvalidValue (the driver's rule for cuMemcpy*). */
typedef struct { uintptr_t a, e; int alloc; } Pin;
static Pin pins[4096]; static int npins = 0; static long long bad_copies = 0;
static int pin_overlapping(uintptr_t a, uintptr_t e) {  /* caller holds g */
  for (int i = 0; i < npins; ++i) if (pins[i].a < e && a < pins[i].e) return i;
  return -1;
}

typedef struct Op {
  int kind; void* dst; const void* src; size_t n; struct Ev* ev; long gen; long us; struct Op* next;
} Op;
typedef struct Ev { pthread_mutex_t mu; pthread_cond_t cv; long rec, fin; } Ev;
typedef struct St {
  pthread_t th; pthread_mutex_t mu; pthread_cond_t cv; Op *head, *tail; int busy, quit, dev; struct St* nxt;
} St;
static St* streams = NULL;

static void* run(void* a) {
  St* s = a;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!s->head && !s->quit) pthread_cond_wait(&s->cv, &s->mu);
    if (!s->head) break;
    Op* o = s->head; s->head = o->next; if (!s->head) s->tail = NULL;
    s->busy = 1;
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_lock(&g); unsigned r = rand_r(&seed); pthread_mutex_unlock(&g);
    usleep(r % 200 + o->us);  /* GPUs finish whenever they like, and a link moves so many bytes a second */
    if (o->kind == 0) memcpy(o->dst, o->src, o->n);
    else { pthread_mutex_lock(&o->ev->mu); if (o->gen > o->ev->fin) o->ev->fin = o->gen;
           pthread_cond_broadcast(&o->ev->cv); pthread_mutex_unlock(&o->ev->mu); }
    free(o);
    pthread_mutex_lock(&s->mu);
    s->busy = 0;
    pthread_cond_broadcast(&s->cv);
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}
static void push(St* s, Op* o) {
  o->next = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->tail) s->tail->next = o; else s->head = o;
  s->tail = o;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}
static void drain(St* s) {
  pthread_mutex_lock(&s->mu);
  while (s->head || s->busy) pthread_cond_wait(&s->cv, &s->mu);
  pthread_mutex_unlock(&s->mu);
}
static E enqueue(void* d, const void* src, size_t n, void* st, long us) {
  Op* o = calloc(1, sizeof *o); o->kind = 0; o->dst = d; o->src = src; o->n = n; o->us = us;
  push(st, o);
  return 0;
}
static long link_us(size_t n) {  /* FAKE_CUDA_H2D_GBPS: each H2D copy takes its bytes at that rate */
  const char* s = getenv("FAKE_CUDA_H2D_GBPS");
  double gbps = s ? atof(s) : 0;
  return gbps > 0 ? (long)(n / (gbps * 1e3)) : 0;
}
static int peer_ok(int a, int b) {
  const char* s = getenv("FAKE_CUDA_NO_PEER");
  char k1[16], k2[16];
  snprintf(k1, sizeof k1, "%d-%d", a, b); snprintf(k2, sizeof k2, "%d-%d", b, a);
  return !(s && (strstr(s, k1) || strstr(s, k2)));
}

E cudaSetDevice(int d) { if (d < 0 || d >= ndev()) return 101; cur = d; return 0; }
E cudaGetDevice(int* d) { *d = cur; return 0; }
E cudaGetDeviceCount(int* c) { *c = ndev(); return 0; }
E cudaStreamCreateWithFlags(void** out, unsigned f) {
  St* s = calloc(1, sizeof *s);
  pthread_mutex_init(&s->mu, NULL); pthread_cond_init(&s->cv, NULL); s->dev = cur;
  pthread_create(&s->th, NULL, run, s);
  pthread_mutex_lock(&g); s->nxt = streams; streams = s; pthread_mutex_unlock(&g);
  *out = s; return 0;
}
E cudaStreamSynchronize(void* s) { drain(s); return 0; }
E cudaStreamDestroy(void* v) {
  St* s = v;
  drain(s);
  pthread_mutex_lock(&s->mu); s->quit = 1; pthread_cond_broadcast(&s->cv); pthread_mutex_unlock(&s->mu);
  pthread_join(s->th, NULL);
  pthread_mutex_lock(&g);
  for (St** p = &streams; *p; p = &(*p)->nxt) if (*p == s) { *p = s->nxt; break; }
  pthread_mutex_unlock(&g);
  free(s); return 0;
}
E cudaDeviceSynchronize(void) {
  pthread_mutex_lock(&g);
  St* all[256]; int n = 0;
  for (St* s = streams; s && n < 256; s = s->nxt) if (s->dev == cur) all[n++] = s;
  pthread_mutex_unlock(&g);
  for (int i = 0; i < n; ++i) drain(all[i]);
  return 0;
}
E cudaEventCreateWithFlags(void** e, unsigned f) {
  Ev* v = calloc(1, sizeof *v); pthread_mutex_init(&v->mu, NULL); pthread_cond_init(&v->cv, NULL); *e = v; return 0;
}
E cudaEventDestroy(void* e) { free(e); return 0; }
E cudaEventRecord(void* e, void* st) {
  Ev* v = e; Op* o = calloc(1, sizeof *o);
  pthread_mutex_lock(&v->mu); o->gen = ++v->rec; pthread_mutex_unlock(&v->mu);
  o->kind = 1; o->ev = v; push(st, o); return 0;
}
E cudaEventSynchronize(void* e) {
  Ev* v = e;
  pthread_mutex_lock(&v->mu); long want = v->rec;
  while (v->fin < want) pthread_cond_wait(&v->cv, &v->mu);
  pthread_mutex_unlock(&v->mu); return 0;
}
E cudaEventQuery(void* e) { Ev* v = e; return v->fin >= v->rec ? 0 : 600; }
static int pins_of(uintptr_t a, uintptr_t e) {  /* 1: one pin holds [a, e); 0: none touches it; -1: mixed */
  int i = pin_overlapping(a, e);
  if (i < 0) return 0;
  return pins[i].a <= a && e <= pins[i].e ? 1 : -1;
}
E cudaMemcpyAsync(void* d, const void* s, size_t n, int k, void* st) {
  if (k == 1) {
    pthread_mutex_lock(&g);
    int mixed = pins_of((uintptr_t)s, (uintptr_t)s + n) < 0;
    if (mixed) ++bad_copies; else h2d[((St*)st)->dev] += n;
    pthread_mutex_unlock(&g);
    if (mixed) return 1;
  }
  return enqueue(d, s, n, st, k == 1 ? link_us(n) : 0);
}
static long peer_calls = 0;
E cudaMemcpyPeerAsync(void* d, int dd, const void* s, int sd, size_t n, void* st) {
  if (dd < 0 || dd >= ndev() || sd < 0 || sd >= ndev()) return 101;
  const char* fail = getenv("FAKE_CUDA_PEER_FAIL_AFTER");  /* a peer link that breaks part way */
  if (fail && __sync_fetch_and_add(&peer_calls, 1) >= atol(fail)) return 1;
  pthread_mutex_lock(&g); peer_out[sd] += n; pthread_mutex_unlock(&g);
  return enqueue(d, s, n, st, 0);
}
E cudaDeviceCanAccessPeer(int* can, int d, int p) { *can = d != p && peer_ok(d, p); return 0; }
E cudaDeviceEnablePeerAccess(int p, unsigned f) {
  if (p < 0 || p >= ndev() || p == cur || !peer_ok(cur, p)) return 217;  /* cudaErrorPeerAccessUnsupported */
  if (enabled[cur][p]) return 704;
  enabled[cur][p] = 1; return 0;
}
E cudaMalloc(void** p, size_t n) {
  const char* lim = getenv("FAKE_CUDA_MALLOC_LIMIT");
  pthread_mutex_lock(&g);
  if (lim && dev_now[cur] + (long long)n > atoll(lim)) { pthread_mutex_unlock(&g); return 2; }
  dev_now[cur] += n; if (dev_now[cur] > dev_peak[cur]) dev_peak[cur] = dev_now[cur];
  pthread_mutex_unlock(&g);
  size_t* b = malloc(n + 16); b[0] = n; b[1] = cur; *p = b + 2; return 0;
}
E cudaFree(void* p) {
  if (!p) return 0;
  size_t* b = (size_t*)p - 2;
  pthread_mutex_lock(&g); dev_now[b[1]] -= b[0]; pthread_mutex_unlock(&g);
  memset(p, 0x5A, b[0]);  /* a copy still reading it would carry this */
  free(b); return 0;
}
static E add_pin(uintptr_t a, uintptr_t e, int alloc) {
  pthread_mutex_lock(&g);
  int i = pin_overlapping(a, e);
  E rc = i >= 0 ? (pins[i].alloc ? 1 : 712) : npins == 4096 ? 2 : 0;
  if (rc == 0) { pins[npins].a = a; pins[npins].e = e; pins[npins].alloc = alloc; ++npins; }
  pthread_mutex_unlock(&g);
  return rc;
}
static E drop_pin(uintptr_t a, int alloc) {
  E rc = 713;  /* cudaErrorHostMemoryNotRegistered */
  pthread_mutex_lock(&g);
  for (int i = 0; i < npins; ++i)
    if (pins[i].a <= a && a < pins[i].e) {
      if (pins[i].a != a || pins[i].alloc != alloc) { rc = 1; break; }
      pins[i] = pins[--npins]; rc = 0; break;
    }
  pthread_mutex_unlock(&g);
  return rc;
}
E cudaHostRegister(void* p, size_t n, unsigned f) {
  uintptr_t a = (uintptr_t)p & ~(uintptr_t)4095, e = ((uintptr_t)p + n + 4095) & ~(uintptr_t)4095;
  return n == 0 ? 1 : add_pin(a, e, 0);
}
E cudaHostUnregister(void* p) { return drop_pin((uintptr_t)p, 0); }
E cudaHostAlloc(void** p, size_t n, unsigned f) {
  *p = malloc(n);
  return add_pin((uintptr_t)*p, (uintptr_t)*p + n, 1);
}
E cudaFreeHost(void* p) { drop_pin((uintptr_t)p, 1); free(p); return 0; }
E cudaGetLastError(void) { return 0; }
const char* cudaGetErrorName(E e) {
  return e == 1 ? "cudaErrorInvalidValue" : e == 2 ? "cudaErrorMemoryAllocation" : e == 101 ? "cudaErrorInvalidDevice"
       : e == 217 ? "cudaErrorPeerAccessUnsupported" : e == 400 ? "cudaErrorInvalidResourceHandle"
       : e == 712 ? "cudaErrorHostMemoryAlreadyRegistered" : e == 713 ? "cudaErrorHostMemoryNotRegistered"
       : "cudaErrorUnknown";
}
const char* cudaGetErrorString(E e) { return "fake"; }
E cudaRuntimeGetVersion(int* v) { *v = 13000; return 0; }
E cudaPointerGetAttributes(void* at, const void* p) {  /* type 1 (cudaMemoryTypeHost) inside a pin */
  memset(at, 0, 16);
  pthread_mutex_lock(&g);
  int i = pin_overlapping((uintptr_t)p, (uintptr_t)p + 1);
  pthread_mutex_unlock(&g);
  if (i >= 0) *(int*)at = 1;
  return 0;
}
long long fake_bad_copies(void) { return bad_copies; }
int fake_pins(void) { return npins; }  /* registrations and cudaHostAlloc blocks alive */
/* A handle is a host address in this process, or "MEMFD:pid:fd:size": another process's memfd
   (its "GPU memory"), mapped shared here, so a sidecar's copies land in the client process. */
static void* maps[1024]; static size_t map_len[1024];
E cudaIpcOpenMemHandle(void** p, H h, unsigned f) {
  int pid, fd; size_t n;
  if (sscanf(h.r, "MEMFD:%d:%d:%zu", &pid, &fd, &n) != 3) { memcpy(p, h.r, sizeof(void*)); return 0; }
  char path[64]; snprintf(path, sizeof path, "/proc/%d/fd/%d", pid, fd);
  int o = open(path, O_RDWR);
  if (o < 0) return 400;
  void* m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, o, 0);
  close(o);
  if (m == MAP_FAILED) return 400;
  pthread_mutex_lock(&g);
  for (int i = 0; i < 1024; ++i) if (!maps[i]) { maps[i] = m; map_len[i] = n; break; }
  pthread_mutex_unlock(&g);
  *p = m; return 0;
}
E cudaIpcCloseMemHandle(void* p) {
  pthread_mutex_lock(&g);
  for (int i = 0; i < 1024; ++i) if (maps[i] == p) { munmap(p, map_len[i]); maps[i] = NULL; }
  pthread_mutex_unlock(&g);
  return 0;
}
E cudaDeviceGetByPCIBusId(int* d, const char* bus) {
  int n = -1; if (sscanf(bus, "0000:00:%x.0", &n) != 1 || n < 6 || n - 6 >= ndev()) return 101;
  *d = n - 6; return 0;
}
E cudaDeviceGetPCIBusId(char* buf, int n, int d) { snprintf(buf, n, "0000:00:%02x.0", 6 + d); return 0; }
long long fake_peer_bytes(int d) { return peer_out[d]; }
long long fake_h2d_bytes(int d) { return h2d[d]; }
long long fake_device_peak(int d) { return dev_peak[d]; }
long long fake_device_now(int d) { return dev_now[d]; }
"""

# A stand-in libnvidia-ml for the relay's link watch (sllmfs.engine.links): each GPU's PCIe
# receive rate is read from the file $FAKE_NVML_RX, lines "<bus id> <KB/s>", so a test plays
# another process loading into a GPU by writing it.
FAKE_NVML = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static char buses[8][32]; static int n = 0;
int nvmlInit_v2(void) { return 0; }
int nvmlDeviceGetHandleByPciBusId_v2(const char* bus, void** h) {
  for (int i = 0; i < n; ++i) if (!strcmp(buses[i], bus)) { *h = (void*)(long)(i + 1); return 0; }
  if (n == 8) return 1;
  strncpy(buses[n], bus, 31); *h = (void*)(long)(++n); return 0;
}
int nvmlDeviceGetPcieThroughput(void* h, int counter, unsigned* kbps) {
  usleep(20000);  /* NVML samples over 20 ms */
  *kbps = 0;
  const char* path = getenv("FAKE_NVML_RX");
  FILE* f = path ? fopen(path, "r") : NULL;
  if (!f) return 0;
  char bus[32]; unsigned v;
  while (fscanf(f, "%31s %u", bus, &v) == 2) if (!strcmp(bus, buses[(long)h - 1]) && counter == 1) *kbps = v;
  fclose(f);
  return 0;
}
"""


def memfd_handle(fd: int, size: int) -> bytes:
    """The 64-byte "IPC handle" the stand-ins above open as another process's memory: this process's
    memfd ``fd`` of ``size`` bytes (the C side parses it: "MEMFD:pid:fd:size")."""
    import os

    return f"MEMFD:{os.getpid()}:{fd}:{size}".encode().ljust(64, b"\0")
