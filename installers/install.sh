#!/usr/bin/env bash
# Set up livediffusion on Linux or macOS: a virtual environment with the daemon and its tools.
#   installers/install.sh [--venv DIR] [--cpu] [--extras daemon,obs,virtualcam]
#                         [--touchdesigner DIR]   (also fill DIR for TouchDesigner's Python)
# Then: DIR/bin/livediffusion doctor; DIR/bin/livediffusion demo
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venv"
extras="daemon"
torch_spec="torch>=2.4"
td_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --extras) extras="$2"; shift 2 ;;
    --cpu) torch_spec="torch==2.13.0"; shift ;;  # the CPU build where a local wheel exists
    --touchdesigner) td_dir="$2"; shift 2 ;;
    -h|--help) sed -n 2,5p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "install.sh: livediffusion needs Python 3.10 or newer." >&2; exit 2; }
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
# torch first, so that the CUDA build matching this machine is the one that stays
"$venv/bin/python" -m pip install "$torch_spec"
"$venv/bin/python" -m pip install -e "$here[$extras]"
"$venv/bin/livediffusion" doctor
if [ -n "$td_dir" ]; then
  "$venv/bin/livediffusion" touchdesigner install "$td_dir"
fi
echo "livediffusion is installed in $venv. Try: $venv/bin/livediffusion demo"
