#!/usr/bin/env python3
"""Writes the guest initramfs: an uncompressed newc cpio archive.

    mkinitramfs.py AGENT OUT [SRC:DEST ...]

Holds only what the agent needs as PID 1: itself as /init, the mount points it uses, and
/dev/console (the kernel opens it for init's stdio before any devtmpfs exists). Entries
have fixed owners and times, so the same agent gives the same archive byte for byte.
Tests add files (SRC copied to DEST, mode kept) and may pass a script as AGENT.
"""
import os
import stat
import sys


def entry(out, ino, name, mode, data=b"", rdev=(0, 0)):
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data),
              0, 0, rdev[0], rdev[1], len(name_b), 0]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(hdr + name_b)
    out.write(b"\0" * (-(len(hdr) + len(name_b)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    agent, dest, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(agent, "rb") as f:
        init = f.read()
    if init[:4] != b"\x7fELF" and init[:2] != b"#!":
        sys.exit(f"mkinitramfs: {agent} is neither an ELF binary nor a script")
    tmp = dest + ".tmp"
    with open(tmp, "wb") as out:
        ino = 1
        for d in ["dev", "proc", "sys", "tmp", "run"]:
            entry(out, ino, d, stat.S_IFDIR | 0o755)
            ino += 1
        entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        entry(out, ino + 1, "init", stat.S_IFREG | 0o755, init)
        ino += 2
        dirs = {"dev", "proc", "sys", "tmp", "run"}
        for spec in extra:
            src, _, target = spec.partition(":")
            target = target.strip("/")
            if not src or not target:
                sys.exit(f"mkinitramfs: bad extra file '{spec}' (want SRC:DEST)")
            parts = target.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    entry(out, ino, d, stat.S_IFDIR | 0o755)
                    dirs.add(d)
                    ino += 1
            with open(src, "rb") as f:
                data = f.read()
            mode = stat.S_IMODE(os.stat(src).st_mode)
            entry(out, ino, target, stat.S_IFREG | mode, data)
            ino += 1
        entry(out, 0, "TRAILER!!!", 0)
    os.replace(tmp, dest)


if __name__ == "__main__":
    main()
