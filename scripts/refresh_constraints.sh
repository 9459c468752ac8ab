#!/usr/bin/env bash
# Rebuild constraints.txt from the newest releases that install together: a throw-away virtual
# environment gets the torch/torchvision pair and the project with every extra, unconstrained,
# and its versions become the new pins. Run the test suite on them (scripts/install.sh --test,
# then pytest) before committing the file: the pins promise a set the tests passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$tmp/venv/bin/python" -m pip install -q ".[test]"
{
  sed -n '1,3p' constraints.txt
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^napari-concept-discovery' | grep -v ' @ '
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins; now run the tests on them"
