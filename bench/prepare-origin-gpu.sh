#!/usr/bin/env bash
# Pack boto3 and moto's S3 server for the GPU machine (no registry there) into .gpu-origin/ (ignored):
# wheels for its Python 3.12, pinned to what the CI venv runs, installed there with --no-index.
#
#     bash bench/prepare-origin-gpu.sh                  # here, once (~15 MB)
#     source .gpu-origin/origin-env.sh                  # there, after `source bench/gpu_setup.sh`
#     python3 bench/bench_origin.py --mb 4000 --repeat 2 --out $OUT   (carry .gpu-origin)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu-origin
PINS=(
  "boto3==1.44.8" "botocore==1.44.8" "s3transfer==0.19.3" "jmespath==1.1.0" "python-dateutil==2.9.0.post0"
  "six==1.17.0" "urllib3==2.8.0" "moto==5.2.5" "flask==3.1.3" "flask-cors==6.0.5" "werkzeug==3.1.9"
  "jinja2==3.1.6" "markupsafe==3.0.4" "itsdangerous==2.2.0" "blinker==1.9.0" "click==8.5.1"
  "xmltodict==1.0.4" "responses==0.26.3" "requests==2.34.2" "certifi==2026.10.19.post1" "idna==3.20"
  "charset-normalizer==3.5.3" "cryptography==50.0.2" "cffi==2.1.1" "pycparser==3.12" "pyyaml==6.0.4"
  "py-partiql-parser==0.6.3"
)
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --platform any \
  -d "$OUT/wheels" "${PINS[@]}"
cat >"$OUT/origin-env.sh" <<'ENV'
# Sourced on the GPU machine: boto3 + moto[server] from the carried wheels (nothing from a registry).
python3 -m pip install -q --no-index --no-deps --find-links .gpu-origin/wheels .gpu-origin/wheels/*.whl 2>&1 \
  | grep -v -i warning || true
python3 -c "import boto3, moto.server; print('origin: boto3', boto3.__version__, 'moto ready')"
ENV
du -sh "$OUT"
