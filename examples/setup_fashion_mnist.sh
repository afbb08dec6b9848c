#!/usr/bin/env bash
# Install ckpt-tools, and Debian's real Fashion-MNIST files when they are missing
# (/usr/share/datasets/fashion-mnist, package dataset-fashion-mnist), for the study in
# examples/03_reproduce_early_phase.py and the benchmarks in bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python -c "from ckpt_tools.data import load; d = load('fashion-mnist'); \
print(f'fashion-mnist: {len(d.y_train)} training and {len(d.y_test)} test images')"
