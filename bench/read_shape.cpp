// A plain reader of files in one request shape, for bench/read_shape.py: `threads` threads take
// `stride`-byte steps of the files from one counter in file order and pread `length` bytes at each
// (length > stride: consecutive reads overlap, as fastsafetensors' 516 KiB reads at 512 KiB strides do).
// Prints the GB/s of the files' bytes (each counted once).
//   read_shape THREADS STRIDE LENGTH DIRECT FILE...
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: read_shape THREADS STRIDE LENGTH DIRECT FILE...\n");
    return 2;
  }
  const int threads = std::atoi(argv[1]);
  const long long stride = std::atoll(argv[2]), length = std::atoll(argv[3]);
  const bool direct = std::atoi(argv[4]) != 0;
  std::vector<std::pair<int, long long>> files;  // fd, size
  long long total = 0;
  std::vector<std::pair<int, long long>> steps;  // file index, offset: file order
  for (int i = 5; i < argc; ++i) {
    const int fd = open(argv[i], O_RDONLY | (direct ? O_DIRECT : 0));
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
      std::perror(argv[i]);
      return 1;
    }
    files.emplace_back(fd, st.st_size);
    total += st.st_size;
    for (long long off = 0; off < st.st_size; off += stride) steps.emplace_back(files.size() - 1, off);
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&] {
    void* buf = nullptr;
    if (posix_memalign(&buf, 4096, static_cast<size_t>(length)) != 0) std::abort();
    for (size_t i; (i = next.fetch_add(1)) < steps.size();) {
      const auto [f, off] = steps[i];
      long long want = std::min(length, files[f].second - off);
      want = (want + 4095) / 4096 * 4096;  // O_DIRECT: whole blocks (the file's end stops it)
      if (pread(files[f].first, buf, static_cast<size_t>(want), off) < 0) failed = true;
    }
    std::free(buf);
  };
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) ts.emplace_back(worker);
  for (auto& t : ts) t.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (failed) {
    std::fprintf(stderr, "read_shape: a read failed\n");
    return 1;
  }
  std::printf("%.4f\n", total / s / 1e9);
  return 0;
}
