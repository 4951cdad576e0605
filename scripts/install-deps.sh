#!/usr/bin/env bash
# Installs what Cocoon's builds and tests need on a Debian 12 host. Idempotent:
# packages already present are not touched, apt is only called when something is missing.
set -euo pipefail

# Host build and test tools (bookworm).
BASE_PKGS=(
  build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
  linux-source-6.1
  e2fsprogs erofs-utils busybox-static libseccomp-dev
  iproute2 util-linux procps python3
  containerd runc containernetworking-plugins protobuf-compiler
)
# QEMU 10 from bookworm-backports: the lab needs it (QEMU 7.2's TCG froze the lab),
# and its qboot.rom firmware avoids SeaBIOS' 30 s stall.
BACKPORTS_PKGS=(qemu-system-x86 qemu-system-data)
BACKPORTS_LIST=/etc/apt/sources.list.d/cocoon-backports.sources

need=()
for p in "${BASE_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
qemu_ok=0
if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
   qemu-system-x86_64 --version | grep -qE 'version (1[0-9]|[2-9][0-9])\.'; then
  qemu_ok=1
fi

if [ ${#need[@]} -eq 0 ] && [ $qemu_ok -eq 1 ]; then
  echo "install-deps: all packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages (${need[*]} ${qemu_ok/1/}) and not root; run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ $qemu_ok -eq 0 ] && [ ! -e "$BACKPORTS_LIST" ]; then
  # Reuse the mirror already configured for bookworm.
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  uri=${uri:-http://deb.debian.org/debian}
  cat >"$BACKPORTS_LIST" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ $qemu_ok -eq 0 ]; then
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BACKPORTS_PKGS[@]}"
fi
echo "install-deps: done"
