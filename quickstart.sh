#!/usr/bin/env bash
# Set up everything vfiofs needs on Debian/Ubuntu, then mount or test.
#
#   ./quickstart.sh mount [MOUNTPOINT]   mount the bundled devices in the foreground (Ctrl-C unmounts)
#   ./quickstart.sh test [PYTEST ARGS]   run the whole test suite
#
# Installs the system packages that are missing (fuse3, libfuse3-dev, pkg-config, a C
# compiler, Python headers and venv), creates .venv and installs vfiofs into it.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv pciutils)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "quickstart: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "quickstart: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

command=${1:-}
shift || true
case "$command" in
  mount)
    mountpoint=${1:-${XDG_RUNTIME_DIR:-/tmp}/vfiofs}
    mkdir -p "$mountpoint"
    echo "quickstart: mounting the bundled devices at $mountpoint (Ctrl-C to unmount)" >&2
    exec .venv/bin/vfiofs mount -f "$mountpoint"
    ;;
  test)
    exec .venv/bin/python -m pytest tests "$@"
    ;;
  *)
    echo "usage: ./quickstart.sh mount [MOUNTPOINT] | ./quickstart.sh test [PYTEST ARGS]" >&2
    exit 2
    ;;
esac
