# Source on the GPU machine from the repo root: sets up SGLang, FUSE and sllmfs there.
#   source bench/gpu_setup.sh [HUGEPAGES]     (HUGEPAGES: 2 MiB pages to reserve, default 8192 = 16 GiB)
# The machine has no package registry: SGLang and FUSE come from the carried .gpu/ folder
# (../shared/gpu/README.md), our native extension is compiled here, our other deps are in its image.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -z "${NO_SGLANG:-}" ] && [ -f .gpu/sglang-env.sh ] && source .gpu/sglang-env.sh
[ -f .gpu/fuse-env.sh ] && source .gpu/fuse-env.sh
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -i warning || true
# The fill hashes with python xxhash: 4.1+ dispatches to the CPU's widest vectors (bench/NOTES-cold.md run 10).
if ls .gpu/wheels/xxhash-*.whl >/dev/null 2>&1 && ! python3 -c "import sys, xxhash; sys.exit(tuple(map(int, xxhash.VERSION.split('.')[:2])) < (4, 1))"; then
  python3 -m pip install -q --no-index --no-deps .gpu/wheels/xxhash-*.whl 2>&1 | grep -v -i warning || true
fi
python3 -c "import xxhash; print('xxhash', xxhash.VERSION)"
python3 -c "import sllmfs._native, trio, pyfuse3; print('sllmfs ready')"
# The memory tier uses hugetlb memfds when pages are reserved: GPU registration is ~2x cheaper.
echo "${1:-8192}" > /proc/sys/vm/nr_hugepages || true
grep -E "HugePages_(Total|Free)" /proc/meminfo
# As systemd/sllmfs.service does: shmem that asks for 2 MiB pages gets them (the mount's passthrough
# copies; some GPU images ship "never", e.g. peers-main-20261202-1839: 2.3-2.6 GB/s copies in 4 KiB pages).
grep -q "\[never\]" /sys/kernel/mm/transparent_hugepage/shmem_enabled && echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
cat /sys/kernel/mm/transparent_hugepage/shmem_enabled
