#!/usr/bin/env bash
# Install one SGLang release's pure-Python parts for the CPU tests (tests/integrations/sglang/).
#
#     .ci/install-sglang.sh              # SGLang 0.5.17 in .venv-sglang (the project's torch)
#     .ci/install-sglang.sh 0.5.23       # SGLang 0.5.23 in .venv-sglang-0.5.23 (its own torch 2.14.1)
#     .venv-sglang/bin/python -m pytest tests/integrations/sglang/
#
# SGLang pins a transformers (5.12.1 for 0.5.17, 5.19.0 for 0.5.23) and a torch we do not use, so
# each release goes into its own venv that sees the main environment's packages after its own (a
# .pth file naming the main environment's site-packages; `venv --system-site-packages` would point
# at the base interpreter, not at a venv the main environment may itself be). 0.5.17 is constrained
# to the main environment's torch; 0.5.23 installs the torch it pins (2.14.1, the CUDA build: the
# only one on these machines' local disk, ~41 s) into its venv, where it shadows the main one.
#
# The releases between (0.5.18-0.5.22) are claimed through the same adapter and were import-checked,
# not run here (README: "SGLang releases").
#
# Idempotent: a second run checks the imports and returns (~16 s). The pinned wheels are kept in a
# wheelhouse that outlives the venvs (SLLMFS_WHEELHOUSE, default ~/.cache/sllmfs-ci/wheels; pip's own
# cache stays empty here: this machine's package mirror answers uncacheable), so a CI run on the same
# machine downloads nothing again. Measured on the 2-core VM, 0.5.23 from scratch: 149 s with an
# empty wheelhouse, 80 s with a full one (torch 2.14.1 from local disk ~41 s of it); both while
# another test run shared the cores.
# SGLANG_VENV overrides the venv path; PYTHON the interpreter that owns the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."

SGLANG_VERSION=${1:-0.5.17}
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${SLLMFS_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/sllmfs-ci/wheels}

# Just enough for sglang.srt.{configs.load_config,server_args,model_loader.loader,plugins} and
# model_executor.model_runner to import, with their own requirements, all pinned and installed with
# --no-deps (no resolver run, nothing else pulled in).
COMMON=(
  "pillow==13.0.0" "starlette==1.10.0" "pybase64==1.5.1"
  "aiohttp==3.14.5" "aiohappyeyeballs==2.7.1" "aiosignal==1.4.0" "frozenlist==1.8.0" "multidict==7.2.1"
  "propcache==0.5.4" "yarl==1.25.1" "pyzmq==27.3.0" "dill==0.4.1" "msgspec==0.22.0"
  "openai==3.54.0" "httpx==0.28.1" "httpcore==1.0.9" "jiter==0.19.0" "partial_json_parser==0.2.1.1.post7"
  "apache-tvm-ffi==0.1.15.post2" "sentencepiece==0.2.3" "einops==0.8.2"
  "compressed-tensors==0.20.0" "loguru==0.7.3" "gguf==0.19.0"
  # imported at module level by sglang.srt.utils and found missing in a fresh venv
  "orjson==3.13.0" "requests==2.34.2" "urllib3==2.8.0" "certifi==2026.10.19.post1"
  "ipython==9.18.1" "traitlets==5.16.1"
  # shadows the main environment's: transformers 5.25 pulls kernels 0.19, whose LayerRepository wants a
  # revision that SGLang's pinned transformers (5.12.1, 5.19.0) does not pass, so `import sglang` failed
  "kernels==0.14.1"
)
case "$SGLANG_VERSION" in
  0.5.17)
    VENV=${SGLANG_VENV:-.venv-sglang}
    OWN_TORCH=()  # the main environment's torch; torchvision is PyPI's CUDA build (tests/support/sglang_env.py)
    DEPS=("transformers==5.12.1" "huggingface_hub==1.33.0" "tokenizers==0.22.2" "triton==3.9.0"
          "torchvision==0.28.0" "xgrammar==0.2.8" "${COMMON[@]}")
    ;;
  0.5.23)
    VENV=${SGLANG_VENV:-.venv-sglang-0.5.23}
    OWN_TORCH=("torch==2.14.1" "torchvision==0.29.1")  # as SGLang 0.5.23 pins; from the local disk
    DEPS=("transformers==5.19.0" "huggingface_hub==1.33.0" "tokenizers==0.23.3" "xgrammar==0.2.7"
          # sglang.srt.model_executor.model_runner (0.5.2x) imports the HTTP stack at module level
          "uvicorn==0.54.0" "fastapi==0.165.0" "opentelemetry-api==1.45.2" "setproctitle==1.3.8"
          "${COMMON[@]}")
    ;;
  *)
    echo "install-sglang: CI runs SGLang 0.5.17 and 0.5.23, not $SGLANG_VERSION" >&2
    exit 2
    ;;
esac
PROBE='import tests.support.sglang_env as t; t.import_sglang(); import sglang, sglang.srt.model_executor.model_runner; assert sglang.__version__ == "'$SGLANG_VERSION'", sglang.__version__'

if [ -x "$VENV/bin/python" ] && PYTHONPATH=. "$VENV/bin/python" -W ignore -c "$PROBE" 2>/dev/null; then
  echo "install-sglang: sglang $SGLANG_VERSION already importable in $VENV"
  exit 0
fi

# shellcheck source=.ci/joined-venv.sh
source .ci/joined-venv.sh  # (the cwd is the repo root)
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ ${#OWN_TORCH[@]} -gt 0 ]; then
  "${PIP[@]}" "${OWN_TORCH[@]}"  # with its dependencies (CUDA libraries, triton) from the local disk
fi
TORCH=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" >"$CONSTRAINTS"

mkdir -p "$WHEELHOUSE"
# what the wheelhouse lacks is fetched once ("File was already downloaded" for the rest), then installed from it
"$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --find-links "$WHEELHOUSE" \
  -d "$WHEELHOUSE" "sglang==$SGLANG_VERSION" "${DEPS[@]}"
"${PIP[@]}" --no-deps --no-index --find-links "$WHEELHOUSE" -c "$CONSTRAINTS" "sglang==$SGLANG_VERSION" "${DEPS[@]}"

"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v == "'"$TORCH"'" else f"torch changed to {v}")'
PYTHONPATH=. "$VENV/bin/python" -W ignore -c "$PROBE"
echo "install-sglang: sglang $SGLANG_VERSION ready in $VENV (torch $TORCH)"
