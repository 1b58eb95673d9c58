#!/usr/bin/env bash
# The SGLang releases between the two CI runs (0.5.18-0.5.22): each wheel alone (--no-deps) in a
# folder of its own, put first on the path of the CI venv whose torch and transformers it pins
# (0.5.18-0.5.21: torch 2.13.0 and transformers 5.12.1, as .venv-sglang; 0.5.22: torch 2.14.1 and
# transformers 5.19.0, as .venv-sglang-0.5.23), then the plugin test module: import, register through
# the same adapter, the patch for that release. Not part of .ci/test (time); the README says which
# releases ran what.
#
#     .ci/install-sglang.sh && .ci/install-sglang.sh 0.5.23 && .ci/install-sglang-between.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${SGLANG_RELEASES_DIR:-.venv-sglang-releases}
for release in ${*:-0.5.18 0.5.19 0.5.20 0.5.21 0.5.22}; do
  # model_executor.model_runner imports the HTTP stack from 0.5.19 on (.venv-sglang-0.5.23 has it)
  EXTRA=()
  case "$release" in
    0.5.18|0.5.19|0.5.20|0.5.21) VENV=.venv-sglang
      EXTRA=("uvicorn==0.54.0" "fastapi==0.165.0" "opentelemetry-api==1.45.2" "setproctitle==1.3.8") ;;
    0.5.22) VENV=.venv-sglang-0.5.23 ;;
    *) echo "install-sglang-between: $release is not between 0.5.17 and 0.5.23" >&2; exit 2 ;;
  esac
  [ -d "$ROOT/$release/sglang" ] || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-deps --target "$ROOT/$release" "sglang==$release" "${EXTRA[@]}"
  echo "== SGLang $release on $VENV"
  PYTHONPATH="$ROOT/$release:." SLLMFS_REQUIRE_SGLANG=1 "$VENV/bin/python" -W ignore -m pytest -q \
    -p no:cacheprovider tests/integrations/sglang/test_sglang_plugin.py
done
