#!/usr/bin/env bash
# Builds a kernel from Debian's linux-source-6.1 with one of our config profiles, cached
# outside the repository by a hash of everything that shapes the result.
#
#   guest-kernel/build.sh guest OUT_DIR   -> OUT_DIR/vmlinux, OUT_DIR/bzImage  (tinyconfig + guest.config)
#   guest-kernel/build.sh lab   OUT_DIR   -> OUT_DIR/bzImage                    (x86_64_defconfig + kvm_guest.config + lab.config)
#
# Kconfig silently drops options whose dependencies are unmet; we fail instead, naming them.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
profile=${1:?usage: build.sh guest|lab OUT_DIR}
out=${2:?usage: build.sh guest|lab OUT_DIR}
cache_root=${COCOON_CACHE:-/var/cache/cocoon}
jobs=${JOBS:-$(nproc)}

case "$profile" in
  guest) bases=(tinyconfig); fragment=$here/guest.config; targets=(vmlinux bzImage) ;;
  lab) bases=(x86_64_defconfig kvm_guest.config); fragment=$here/lab.config; targets=(bzImage) ;;
  *) echo "build.sh: unknown profile '$profile' (guest or lab)" >&2; exit 2 ;;
esac

if [ ! -f /usr/src/linux-source-6.1.tar.xz ]; then
  echo "build.sh: installing linux-source-6.1" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-source-6.1
fi
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$profile ${bases[*]} ${targets[*]} $srcver"; gcc --version | head -1; cat "$fragment"; } |
       sha256sum | cut -c1-16)
cache=$cache_root/kernel/$profile-$key
mkdir -p "$cache_root/kernel" "$cache_root/src" "$out"

exec 9>"$cache.lock"
flock 9

copy_out() {
  for t in "${targets[@]}"; do cp -f "$cache/$t" "$out/$t"; done
  echo "build.sh: $profile kernel $key -> $out (${targets[*]})"
}
if [ -f "$cache/done" ]; then
  copy_out
  exit 0
fi

src=$cache_root/src/linux-source-6.1-$srcver
if [ ! -f "$src/Makefile" ]; then
  echo "build.sh: unpacking linux-source $srcver" >&2
  tmp=$(mktemp -d "$cache_root/src/.unpack.XXXXXX")
  tar -xf /usr/src/linux-source-6.1.tar.xz -C "$tmp"
  rm -rf "$src"
  mv "$tmp/linux-source-6.1" "$src"
  rmdir "$tmp"
fi

obj=$cache/obj
rm -rf "$obj"
mkdir -p "$obj"
kmake() { make -s -C "$src" O="$obj" ARCH=x86_64 "$@"; }
for b in "${bases[@]}"; do kmake "$b" >/dev/null; done
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$fragment" >/dev/null
kmake olddefconfig >/dev/null

missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF "$line" "$obj/.config" || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$obj/.config" || echo absent))")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    ! grep -qE "^${BASH_REMATCH[1]}=" "$obj/.config" || missing+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$obj/.config"))")
  fi
done <"$fragment"
if [ ${#missing[@]} -gt 0 ]; then
  echo "build.sh: $profile config: these requested options did not survive Kconfig:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

echo "build.sh: building $profile kernel $key with $jobs jobs (source $srcver)" >&2
start=$(date +%s)
kmake -j"$jobs" "${targets[@]}"
for t in "${targets[@]}"; do
  case $t in
    vmlinux) cp -f "$obj/vmlinux" "$cache/vmlinux" ;;
    bzImage) cp -f "$obj/arch/x86/boot/bzImage" "$cache/bzImage" ;;
  esac
done
cp -f "$obj/.config" "$cache/config"
echo "$(( $(date +%s) - start ))" >"$cache/build-seconds"
touch "$cache/done"
echo "build.sh: $profile kernel built in $(cat "$cache/build-seconds")s" >&2
copy_out
