#!/usr/bin/env bash
# Install SGLang 0.5.17's pure-Python parts for the CPU tests (tests/integrations/sglang/).
#
# SGLang pins transformers==5.12.1 (its configs clash with newer ones) and torch==2.11;
# we keep the project's torch and everything else, so SGLang goes into its own venv
# that sees the main environment's packages after its own (a .pth file naming the main
# environment's site-packages; `venv --system-site-packages` would point at the base
# interpreter, not at a venv the main environment may itself be):
#
#     .ci/install-sglang.sh                      # creates/updates .venv-sglang
#     .venv-sglang/bin/python -m pytest tests/integrations/sglang/
#
# Idempotent: a second run checks the imports and returns. Never installs another torch:
# every pip call is constrained to the torch that is already there.
# SGLANG_VENV overrides the venv path; PYTHON the interpreter that owns torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SGLANG_VENV:-.venv-sglang}
SGLANG_VERSION=0.5.17
# Just enough for sglang.srt.{configs.load_config,server_args,model_loader.loader,plugins} to import,
# with their own requirements, all pinned and installed with --no-deps (no resolver run, nothing else
# pulled in). torchvision is PyPI's CUDA build: tests/support/sglang_env.py lets it import beside a CPU torch.
DEPS=(
  "transformers==5.12.1" "huggingface_hub==1.33.0" "tokenizers==0.22.2"
  "triton==3.9.0" "torchvision==0.28.0" "pillow==13.0.0" "starlette==1.10.0" "pybase64==1.5.1"
  "aiohttp==3.14.5" "aiohappyeyeballs==2.7.1" "aiosignal==1.4.0" "frozenlist==1.8.0" "multidict==7.2.1"
  "propcache==0.5.4" "yarl==1.25.1" "pyzmq==27.3.0" "dill==0.4.1" "msgspec==0.22.0"
  "openai==3.54.0" "httpx==0.28.1" "httpcore==1.0.9" "jiter==0.19.0" "partial_json_parser==0.2.1.1.post7"
  "xgrammar==0.2.8" "apache-tvm-ffi==0.1.15.post2" "sentencepiece==0.2.3" "einops==0.8.2"
  "compressed-tensors==0.20.0" "loguru==0.7.3" "gguf==0.19.0"
  # imported at module level by sglang.srt.utils and found missing in a fresh venv
  "orjson==3.13.0" "requests==2.34.2" "urllib3==2.8.0" "certifi==2026.10.19.post1"
  "ipython==9.18.1" "traitlets==5.16.1"
)
PROBE='import tests.support.sglang_env as t; t.import_sglang(); import sglang; assert sglang.__version__ == "'$SGLANG_VERSION'", sglang.__version__'

if [ -x "$VENV/bin/python" ] && PYTHONPATH=. "$VENV/bin/python" -W ignore -c "$PROBE" 2>/dev/null; then
  echo "install-sglang: sglang $SGLANG_VERSION already importable in $VENV"
  exit 0
fi

TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__)')
MAIN_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
VENV_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path) so the main environment's own .pth files (editable installs) apply too
echo "import site; site.addsitedir('$MAIN_SITE')" >"$VENV_SITE/zz-sllmfs-main-env.pth"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" >"$CONSTRAINTS"

"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -c "$CONSTRAINTS" \
  "sglang==$SGLANG_VERSION" "${DEPS[@]}"

"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v == "'"$TORCH"'" else f"torch changed to {v}")'
PYTHONPATH=. "$VENV/bin/python" -W ignore -c "$PROBE"
echo "install-sglang: sglang $SGLANG_VERSION ready in $VENV (torch $TORCH)"
