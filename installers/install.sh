#!/usr/bin/env bash
# Set up livediffusion on Linux or macOS: a virtual environment with the daemon and its tools.
#   installers/install.sh [--venv DIR] [--cpu] [--extras daemon,obs,virtualcam]
#                         [--touchdesigner DIR]   (also fill DIR for TouchDesigner's Python)
#                         [--obs]   (also build the OBS filter plugin into OBS's plugin folder)
# Then: DIR/bin/livediffusion doctor; DIR/bin/livediffusion demo
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venv"
extras="daemon"
torch_spec="torch>=2.11"
td_dir=""
obs=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --extras) extras="$2"; shift 2 ;;
    --cpu) torch_spec="torch==2.13.0"; shift ;;  # the CPU build where a local wheel exists
    --touchdesigner) td_dir="$2"; shift 2 ;;
    --obs) obs=1; shift ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "install.sh: livediffusion needs Python 3.10 or newer." >&2; exit 2; }
if [ "$obs" = 1 ]; then
  case ",$extras," in *,obs,*) ;; *) extras="$extras,obs" ;; esac
  if command -v apt-get >/dev/null 2>&1; then  # Debian/Ubuntu: what the plugin builds with
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y cmake pkg-config build-essential libobs-dev libzmq3-dev
  elif command -v brew >/dev/null 2>&1; then
    brew install cmake pkg-config zeromq
  fi
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
# torch first, so that the CUDA build matching this machine is the one that stays
"$venv/bin/python" -m pip install "$torch_spec"
"$venv/bin/python" -m pip install -e "$here[$extras]"
"$venv/bin/livediffusion" doctor
if [ -n "$td_dir" ]; then
  "$venv/bin/livediffusion" touchdesigner install "$td_dir"
fi
if [ "$obs" = 1 ]; then
  "$venv/bin/livediffusion" obs install
fi
echo "livediffusion is installed in $venv. Try: $venv/bin/livediffusion demo"
