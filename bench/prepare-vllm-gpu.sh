#!/bin/bash
# Packs a real vLLM 0.26.0 runtime for the GPU test machines (H200; Python 3.12, torch 2.11.0+cu130,
# transformers 5.17, no package registry), as ../shared/gpu/prepare-sglang.sh packs SGLang.
# Run it HERE, from the repo root:     bash bench/prepare-vllm-gpu.sh [.gpu-vllm]
# It writes .gpu-vllm/vllm-site.tar.xz and .gpu-vllm/vllm-env.sh (git-ignored). There:
#     source bench/gpu_setup.sh 8192 && source .gpu-vllm/vllm-env.sh && python3 bench/bench_vllm.py
#
# What is trimmed (the engine on an H200 with the Triton attention backend, bf16, never loads it):
#   FA2/FA3 kernels (vllm_flash_attn/*.so, 437 MB), FlashMLA, QuTLASS, the MoE kernels, DeepGEMM,
#   Blackwell-only kernels (fmha_sm100, tml_fa4), the Rust frontend binary (vllm-rs, only with
#   VLLM_RUST_FRONTEND_PATH); and in vLLM's one kernel library it does load, _C_stable_libtorch,
#   every architecture's device code but sm_90 (bench/prune_fatbin.py: 52 -> 17 MiB, same offsets).
# Dependencies: only what `LLM(...)` imports and the image lacks (checked with the image's package
# list in a clean Python 3.12 venv: PROBE below); the image's own torch, transformers, numpy stay.
# Size: see the printout; the pack alone fits one GPU call (64 MiB with the working tree), not
# together with the SGLang pack (.gpu/, 44 MB): run vLLM in its own call (NO_SGLANG=1).
# About 1 minute here (the 304 MB vLLM wheel is cached in $WORK/wheels after the first run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=$(mkdir -p "${1:-.gpu-vllm}" && cd "${1:-.gpu-vllm}" && pwd)
WORK=${WORK:-/tmp/vllm-prep}
SM=${SM:-90}  # H100/H200; SM=all keeps every architecture (~36 MB more xz: over 64 MiB, it would have to be split over two calls)
mkdir -p "$WORK/wheels"; rm -rf "$WORK/site"; mkdir -p "$WORK/site"

# The GPU machine runs CPython 3.12 on x86_64; spell each manylinux tag out.
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform linux_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for n in 17 24 27 28 31 34 35; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done

PKGS=(
  vllm==0.26.0
  # imported by LLM(...) on the way to a generate, absent from the GPU image:
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  pyzmq==27.3.0 msgspec==0.23.0 cbor2==6.3.0 pybase64==1.5.1 cachetools==8.0.2
  openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8  # openai 3 needs httpx2
  llguidance==1.7.6 xgrammar==0.2.1 apache-tvm-ffi==0.1.10 partial-json-parser==0.2.1.1.post7
  fastapi==0.136.3 starlette==1.10.0 setproctitle==1.3.8 blake3==1.0.11
  ${EXTRA_PKGS:-}
)
python3 -m pip download -q --no-deps $PLAT -d "$WORK/wheels" "${PKGS[@]}"
FILES=(); for s in "${PKGS[@]}"; do n=${s%%==*}; v=${s#*==}; n=${n//-/_}
  FILES+=("$(ls "$WORK"/wheels/* | grep -i "/${n}-${v}-" | head -1)"); done
python3 -m pip install -q --no-deps --no-compile --target "$WORK/site" $PLAT "${FILES[@]}"

cd "$WORK/site"
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so
rm -f vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/_qutlass_C.abi3.so
rm -f vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs
rm -rf vllm/third_party/deep_gemm vllm/third_party/fmha_sm100 vllm/third_party/tml_fa4
# vLLM imports vllm_flash_attn on CUDA at start-up (v1/attention/backends/fa_utils.py) even when the
# Triton backend serves attention, and that package refuses to import without the FA kernels removed
# above: in this measurement pack only, it imports and its functions fail if ever called
python3 - <<'PY'
p = "vllm/vllm_flash_attn/__init__.py"
s = open(p).read()
old = "if not (FA2_AVAILABLE or FA3_AVAILABLE):\n    raise ImportError("
assert old in s, "vllm_flash_attn's import guard changed: update prepare-vllm-gpu.sh"
open(p, "w").write(s.replace(old, "if False:  # sllmfs GPU pack: FA kernels left out, Triton attention\n    raise ImportError("))
PY
[ "$SM" = all ] || python3 "$HERE/prune_fatbin.py" "$SM" vllm/_C_stable_libtorch.abi3.so
rm -f xgrammar/lib/libxgrammar.a                                 # static lib, build-time only
strip --strip-debug xgrammar/*.so                                # debug info only
find . -name __pycache__ -prune -exec rm -rf {} +
rm -rf bin  # console scripts with this machine's paths; run `python3 -m vllm.entrypoints.cli.main` there
cd "$WORK"
tar -cf - site | xz -T0 -9 > "$DEST/vllm-site.tar.xz"
cp "$HERE/vllm-env.sh" "$DEST/"
ls -la "$DEST"
echo "Keep ${1:-.gpu-vllm}/ ignored by git and carry it to the GPU machine (alone: not with .gpu/)."
