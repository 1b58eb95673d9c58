# Source on the GPU machine from the repo root, after bench/gpu_setup.sh:  source .gpu-vllm/vllm-env.sh
# (bench/prepare-vllm-gpu.sh copies this file there). Unpacks vllm-site.tar.xz beside it into
# /tmp/vllm-site (reused while the machine stays warm) and puts that first on PYTHONPATH: a real
# vLLM 0.26.0 on the image's torch 2.11.0. Works offline. Not together with SGLang's env (each pins
# its own packages): bench/gpu_setup.sh with NO_SGLANG=1.
_vl_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VLLM_SITE=/tmp/vllm-site
if [ ! -f $VLLM_SITE/.ok ] || [ "$_vl_dir/vllm-site.tar.xz" -nt $VLLM_SITE/.ok ]; then
  rm -rf $VLLM_SITE /tmp/vllm-x && mkdir -p /tmp/vllm-x &&
  python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall('/tmp/vllm-x')" "$_vl_dir/vllm-site.tar.xz" &&
  mv /tmp/vllm-x/site $VLLM_SITE && touch $VLLM_SITE/.ok || echo "vllm-env: unpack failed" >&2
fi
export PYTHONPATH=$VLLM_SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# the pack carries no FlashInfer: vLLM's sampler would import it on CUDA (seen on the H200: the fast path
# loaded, then ModuleNotFoundError: flashinfer); PyTorch's top-k/top-p sampler instead
export VLLM_USE_FLASHINFER_SAMPLER=0
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
