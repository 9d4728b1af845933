"""ssm-golf sandbox audit hook, loaded as `sitecustomize` by every Python process of a sandboxed run.

Stdlib only and self-contained: the sandbox puts this folder first on PYTHONPATH of the child. When
SSM_GOLF_AUDIT_LOG names a file, a `sys.addaudithook` hook appends one JSON line per event worth a
reviewer's eye: the process start, socket connects and name lookups to anything but loopback (refused
when SSM_GOLF_AUDIT_BLOCK_NET=1), file opens outside the allowed roots, program spawns, and any open of the
audit log itself (tampering). The validator turns these lines into findings (validator/sandbox/audit.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

_WATCHED = frozenset(
    {
        "open",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.symlink",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_MAX_EVENTS_PER_KIND = 200
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "", None}


def _split_roots(value: str | None) -> tuple[str, ...]:
    return tuple(os.path.realpath(p) for p in (value or "").split(os.pathsep) if p)


def _python_roots() -> tuple[str, ...]:
    """Python's own installation: prefixes, the standard library and every import path present at start."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(p for p in sys.path if p and os.path.isabs(p) and os.path.dirname(p) != p)
    return tuple(os.path.realpath(r) for r in roots)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


class _Auditor:
    def __init__(self, log_path: str) -> None:
        self.log_path = os.path.realpath(log_path)
        self.fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.read_roots = _split_roots(os.environ.get("SSM_GOLF_AUDIT_READ_ROOTS")) + _python_roots()
        self.write_roots = _split_roots(os.environ.get("SSM_GOLF_AUDIT_WRITE_ROOTS"))
        self.block_net = os.environ.get("SSM_GOLF_AUDIT_BLOCK_NET") == "1"
        self.own_names = {socket.gethostname()}
        self.seen: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {}
        self.busy = threading.local()

    def write(self, kind: str, **fields: object) -> None:
        count = self.counts.get(kind, 0)
        if count > _MAX_EVENTS_PER_KIND:
            return
        self.counts[kind] = count + 1
        if count == _MAX_EVENTS_PER_KIND:
            fields = {"detail": f"more than {_MAX_EVENTS_PER_KIND} {kind} events; the rest are not recorded"}
            kind = "truncated"
        record = {"t": round(time.time(), 3), "pid": os.getpid(), "kind": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode("utf-8", "replace"))

    def hook(self, event: str, args: tuple) -> None:
        if event not in _WATCHED or getattr(self.busy, "on", False):
            return
        self.busy.on = True
        try:
            refusal = self.handle(event, args)
        finally:
            self.busy.on = False
        if refusal:
            raise PermissionError(f"ssm-golf sandbox: {refusal}")

    def handle(self, event: str, args: tuple) -> str | None:
        """Record the event if it matters; return why it is refused, or None to let it happen."""
        if event == "open":
            return self.on_open(args[0], args[2])
        if event == "os.symlink":
            return self.on_open(args[0], 0)
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            return self.on_connect(event, args[1] if len(args) > 1 else None)
        if event.startswith("socket.gethostby") or event == "socket.getaddrinfo":
            return self.on_lookup(event, args[0])
        self.on_spawn(event, args)
        return None

    def on_open(self, path: object, flags: object) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        writing = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        if real == self.log_path:
            self.write("tamper", path=real, write=writing)
            return "the audit log is not the script's to open"
        if writing and not _under(real, self.write_roots):
            self.once("write_outside", real)
            return f"writing {real} refused: the run may write only in its work dir, home and temp"
        elif not writing and not _under(real, self.read_roots):
            self.once("read_outside", real)
        return None

    def once(self, kind: str, path: str) -> None:
        if (kind, path) not in self.seen:
            self.seen.add((kind, path))
            self.write(kind, path=path)

    def on_connect(self, event: str, address: object) -> str | None:
        if isinstance(address, (str, bytes)):  # AF_UNIX path: stays on this machine
            return None
        host = address[0] if isinstance(address, tuple) and address else address
        if _is_loopback(host):
            return None
        self.write("network", event=event, address=repr(address), refused=self.block_net)
        return f"network access refused ({event}); the run has no network" if self.block_net else None

    def on_lookup(self, event: str, host: object) -> str | None:
        name = os.fsdecode(host) if isinstance(host, (str, bytes)) else host
        if name in _LOCAL_HOSTS or name in self.own_names or _is_loopback(name):
            return None
        self.write("network", event=event, address=repr(name), refused=self.block_net)
        return f"network access refused ({event}); the run has no network" if self.block_net else None

    def on_spawn(self, event: str, args: tuple) -> None:
        if event == "subprocess.Popen":
            executable, argv = args[0], args[1]
        elif event == "os.system":
            executable, argv = "/bin/sh", ["/bin/sh", "-c", args[0]]
        elif event == "os.spawn":
            executable, argv = args[1], args[2]
        else:  # os.exec, os.posix_spawn: (path, argv, env)
            executable, argv = args[0], args[1]
        argv_list = [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in _as_list(argv)]
        exe = os.fsdecode(executable) if executable is not None else (argv_list[0] if argv_list else "")
        self.write("spawn", event=event, executable=exe, argv=argv_list[:16])


def _as_list(argv: object) -> list:
    if isinstance(argv, (str, bytes, os.PathLike)):
        return [argv]
    try:
        return list(argv)  # type: ignore[call-overload]
    except TypeError:
        return [argv]


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    return host in ("localhost", "::1") or host.startswith("127.") or host.startswith("::ffff:127.")


def _install() -> None:
    log_path = os.environ.get("SSM_GOLF_AUDIT_LOG")
    if not log_path:
        return
    auditor = _Auditor(log_path)
    auditor.write("start", ppid=os.getppid(), argv=list(sys.argv), executable=sys.executable)
    sys.addaudithook(auditor.hook)


_install()
