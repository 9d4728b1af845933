"""Run a command inside a fresh network namespace with only loopback up (the local backend's network block).

Invoked as `unshare -n python netns.py -- CMD...`: brings `lo` up (torchrun's rendezvous and NCCL's bootstrap
use it), then replaces itself with CMD, so the sandbox's process bookkeeping sees CMD under the same pid.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq: name, flags, padding to 40 bytes


def bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        current = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0))
        flags = struct.unpack(IFREQ, current)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: netns.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    bring_loopback_up()
    os.execvp(argv[1], argv[1:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
