#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the project installed.
#   bash scripts/install.sh          # the library, CLI and napari plugin (with Qt)
#   bash scripts/install.sh --test   # plus test tools and the Debian packages that a headless
#                                    # Qt/OpenGL test needs (Xvfb, Mesa, xcb) and chromium (the
#                                    # HTML report is rendered in it); needs root or sudo
# Both install within constraints.txt (the versions the tests last passed with), so running them
# in either order, or again later, gives the same working set.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  pkgs="xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4
        libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
        libxcb-xinput0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
        chromium"
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
    $SUDO apt-get clean  # the downloaded .deb files are not needed once installed
  fi
  extra="[test]"
else
  extra="[pyqt6]"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# no copy of the (multi-GB) wheels in pip's cache: the venv is the only place they need to be
export PIP_NO_CACHE_DIR=1
.venv/bin/python -m pip install -q --upgrade pip
# timm imports torchvision, and PyPI's torchvision only loads beside the torch build it was made
# for: install the matching pair first, so that pip neither pulls another multi-GB torch nor
# mixes builds.
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
echo "installed into .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
