#!/usr/bin/env bash
# Installs a built Cocoon where containerd and the runtime look for it (`make install`):
#   $PREFIX/bin/containerd-shim-cocoon-v1   containerd finds shims in its PATH
#   $PREFIX/bin/cocoon-vmm, $PREFIX/bin/cocoon
#   $PREFIX/share/cocoon/{vmlinux,initramfs.cpio}
#   $CONFIG (/etc/cocoon/config.toml), written only when absent: an operator's edits stay.
# Binaries are replaced by rename, so running shims and VMMs keep their old files.
# PREFIX (default /usr/local) and CONFIG move things; DESTDIR stages into another root.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
CONFIG=${CONFIG:-/etc/cocoon/config.toml}
DESTDIR=${DESTDIR:-}
BUILD=${BUILD:-build}
RELEASE=${RELEASE:-target/release}

# source, destination, mode
files=(
  "$RELEASE/containerd-shim-cocoon-v1" "$PREFIX/bin/containerd-shim-cocoon-v1" 0755
  "$RELEASE/cocoon" "$PREFIX/bin/cocoon" 0755
  "$BUILD/cocoon-vmm" "$PREFIX/bin/cocoon-vmm" 0755
  "$BUILD/vmlinux" "$PREFIX/share/cocoon/vmlinux" 0644
  "$BUILD/initramfs.cpio" "$PREFIX/share/cocoon/initramfs.cpio" 0644
)

missing=0
for ((i = 0; i < ${#files[@]}; i += 3)); do
  if [ ! -f "${files[i]}" ]; then
    echo "install: ${files[i]} missing (run \`make install\`, which builds it first)" >&2
    missing=1
  fi
done
[ $missing -eq 0 ] || exit 1

for ((i = 0; i < ${#files[@]}; i += 3)); do
  src=${files[i]} dst=$DESTDIR${files[i + 1]} mode=${files[i + 2]}
  mkdir -p "$(dirname "$dst")"
  tmp=$(mktemp "$dst.XXXXXX")
  cp "$src" "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dst"
  echo "install: $dst"
done

config=$DESTDIR$CONFIG
if [ -e "$config" ]; then
  echo "install: $config exists, left as it is"
else
  mkdir -p "$(dirname "$config")"
  cat >"$config.tmp" <<EOF
# Cocoon runtime configuration, read by every containerd-shim-cocoon-v1 on this node.
# Written by scripts/install.sh; every key and its default: runtime/src/config.rs.
vmm = "$PREFIX/bin/cocoon-vmm"
kernel = "$PREFIX/share/cocoon/vmlinux"
initramfs = "$PREFIX/share/cocoon/initramfs.cpio"
# Boot log on the guest console (console.log, \`cocoon console\`): warnings only; "" for all.
kernel_cmdline = "quiet"

# A pod's VM when neither its annotations (io.cocoon.vcpus, io.cocoon.memory-mib) nor
# its containers' limits say more; limits are added on top of this base.
default_vcpus = 1
default_memory_mib = 256
max_vcpus = 16
max_memory_mib = 16384

# A container's writable disk (sparse) when it has no ephemeral-storage limit.
writable_disk_size = "10G"
image_dir = "/var/lib/cocoon/images"
state_dir = "/run/cocoon"
log_level = "info"
EOF
  mv -f "$config.tmp" "$config"
  echo "install: $config written"
fi
