#!/usr/bin/env bash
# Install vLLM 0.26.0 for the CPU tests (tests/integrations/vllm/).
#
# vLLM 0.26.0 pins torch==2.11.0 (its compiled parts are built against it; the GPU machines run
# it too), so vLLM goes into its own venv with that torch from PyPI, seeing the main environment's
# packages after its own through a .pth (as .ci/install-sglang.sh does for SGLang):
#
#     .ci/install-vllm.sh                        # creates/updates .venv-vllm
#     .venv-vllm/bin/python -m pytest tests/integrations/vllm/
#
# Measured here: 84 s (torch 2.11.0 and its CUDA libraries ~4.5 GB unpacked, vLLM 304 MB).
# Idempotent: a second run checks the imports and returns. VLLM_VENV overrides the venv path;
# PYTHON the interpreter of the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=0.26.0
TORCH_VERSION=2.11.0  # vLLM 0.26.0's own pin
# Just enough for vllm.model_executor.model_loader to import and for vLLM to build a Llama on the
# CPU, all pinned and installed with --no-deps (no resolver run over vLLM's GPU-only requirements).
DEPS=(
  "pyzmq==27.3.0" "cbor2==6.3.0" "aiohttp==3.14.5" "multidict==7.2.1" "yarl==1.25.1" "propcache==0.5.4"
  "aiohappyeyeballs==2.7.1" "aiosignal==1.4.0" "frozenlist==1.8.0" "openai-harmony==0.0.8" "openai==3.57.0"
  "einops==0.8.2" "cloudpickle==3.1.3" "pillow==13.0.0" "pybase64==1.5.1" "cachetools==8.0.2"
  "msgspec==0.23.0" "uvloop==0.23.0" "py-cpuinfo==9.0.0"
)
PROBE='import torch, vllm, vllm.model_executor.model_loader; assert vllm.__version__ == "'$VLLM_VERSION'", vllm.__version__; assert torch.__version__.split("+")[0] == "'$TORCH_VERSION'", torch.__version__'
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-ERROR}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -W ignore -c "$PROBE" 2>/dev/null; then
  echo "install-vllm: vllm $VLLM_VERSION already importable in $VENV"
  exit 0
fi

# shellcheck source=.ci/joined-venv.sh
source .ci/joined-venv.sh  # (the cwd is the repo root)

PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch with its own pinned requirements (CUDA libraries, triton): `import torch` loads them even on a CPU
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" --no-deps "vllm==$VLLM_VERSION" "${DEPS[@]}"
"$VENV/bin/python" -W ignore -c "$PROBE"
echo "install-vllm: vllm $VLLM_VERSION ready in $VENV (torch $TORCH_VERSION)"
