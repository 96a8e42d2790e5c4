#!/usr/bin/env bash
# Installs what building and testing pyebpflb needs on Debian 12, skipping
# what is present, then makes the virtualenv .venv with the package and its
# dev extras. Run as root (make demo / make test call it).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config make gcc libc6-dev
  linux-libc-dev iproute2 bpftool clang-format python3 python3-dev python3-venv
  iptables nftables wrk nginx-light
)

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: pyebpflb loads BPF programs and needs root (CAP_BPF, CAP_NET_ADMIN); run as root" >&2
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter, which every user can run: the pure tests pass as an
# unprivileged user too (`sudo -u nobody .venv/bin/pytest -m "not kernel"`),
# and an interpreter under /root is not theirs to read.
PYTHON=${PYTHON:-/usr/bin/python3}
home=$(dirname "$(readlink -f "$PYTHON")")
if [ -f .venv/pyvenv.cfg ] && ! grep -qx "home = $home" .venv/pyvenv.cfg; then
  echo "bootstrap: remaking .venv with $PYTHON"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pyebpflb-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel "cffi>=1.16"
  .venv/bin/python -m pip install -q --no-build-isolation -e '.[dev]' >/dev/null
  touch "$stamp"
fi
