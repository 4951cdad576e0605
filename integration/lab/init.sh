#!/bin/sh
# PID 1 of the test lab (see docs/test-lab.md). The lab's root is the host's / over 9p,
# read-only; this script makes scratch space writable, runs the job the lab runner put in
# the `labjob` share, records its exit status there and powers the lab off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=${TERM:-dumb}

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp, /var/tmp and /root become writable without hiding the host's files (the
# repository or a CI clone may live under /tmp): an overlay whose upper layer is tmpfs.
# Writes stay inside the lab. /var/lib too: CNI keeps its result cache in /var/lib/cni
# (containerd cannot move it) and the cocoon runtime its image-disk cache in
# /var/lib/cocoon (CRI tests, integration/tests/cri.rs).
for d in /tmp /var/tmp /root /var/lib; do
  s=/run/lab/scratch$(echo "$d" | tr / _)
  mkdir -p "$s/upper" "$s/work"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$s/upper,workdir=$s/work" "$d" ||
    mount -t tmpfs -o mode=0755 tmpfs "$d"
done
chmod 1777 /tmp /var/tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# KVM per-VM statistics (exit counts) for benchmarks.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ip link set lo up 2>/dev/null

job=/run/lab/job
mkdir -p "$job"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 labjob "$job"; then
  echo "cocoon-lab: cannot mount the job share"
  echo o >/proc/sysrq-trigger
fi
export COCOON_IN_LAB=1 COCOON_LAB_OUT="$job/out"
echo "cocoon-lab: up $(cut -d' ' -f1 /proc/uptime)s"

if [ -f "$job/interactive" ]; then
  # A login-like shell on the console, with job control.
  setsid -c /bin/bash -l </dev/ttyS0 >/dev/ttyS0 2>&1
  status=$?
else
  sh "$job/run.sh" </dev/null
  status=$?
fi
echo "$status" >"$job/status.tmp" && mv "$job/status.tmp" "$job/status"
sync
echo "cocoon-lab: exit $status"
echo o >/proc/sysrq-trigger
# Power-off is asynchronous and tears down the 9p root: wait with shell builtins only,
# since init exiting would panic the lab.
while :; do :; done
