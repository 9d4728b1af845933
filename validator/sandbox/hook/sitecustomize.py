"""ssm-golf sandbox audit hook, loaded as `sitecustomize` by every Python process of a sandboxed run.

Stdlib only and self-contained: the sandbox puts this folder first on PYTHONPATH of the child. When
SSM_GOLF_AUDIT_LOG names a file, a `sys.addaudithook` hook appends one JSON line per event worth a
reviewer's eye: the process start, socket connects and name lookups to anything but loopback (refused
when SSM_GOLF_AUDIT_BLOCK_NET=1), file opens outside the allowed roots, program spawns, and any open, removal,
rename, link or truncation of the audit log or a folder holding it (tampering: refused). A Python child that
would start without this hook (-I/-S/-E, or an environment that drops its settings) is refused and recorded.
Every event that can become a finding is recorded; only spawns of the programs the sandbox names as benign
(SSM_GOLF_AUDIT_BENIGN_PROGRAMS, SSM_GOLF_AUDIT_BENIGN_RE) are capped, per program, and counted past the cap.
The validator turns these lines into findings (validator/sandbox/audit.py).
"""

from __future__ import annotations

import json
import os
import re
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
        "os.link",
        "os.remove",
        "os.rename",
        "os.truncate",
        "os.rmdir",
        "shutil.rmtree",
    }
)
# Interpreter options that start Python without this hook: -I (isolated), -S (no site), -E (no PYTHON* variables).
_HOOK_DEFEATING = frozenset("ISE")
_OPTIONS_WITH_ARGUMENT = frozenset("WXcm")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_MAX_BENIGN_SPAWNS = 200  # per benign program; later ones are only counted
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


def hook_defeating_flags(argv: list[str]) -> str:
    """The options among a Python command line's interpreter options (before the script, -c or -m) that skip this
    hook, combined short flags included (`-uI`): e.g. "I", or "" when there are none."""
    found = ""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "--":
            break
        if arg.startswith("--"):
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j, flag in enumerate(arg[1:], start=1):
            if flag in _HOOK_DEFEATING:
                found += flag
            if flag in _OPTIONS_WITH_ARGUMENT:
                if flag in "cm":
                    return found
                if j == len(arg) - 1:
                    i += 1  # -W arg, -X arg: the argument is the next word
                break
        i += 1
    return found


class _Auditor:
    def __init__(self, log_path: str) -> None:
        self.log_env = log_path
        self.log_path = os.path.realpath(log_path)
        self.fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        stat = os.fstat(self.fd)
        self.log_id = (stat.st_dev, stat.st_ino)
        self.hook_dir = os.path.dirname(os.path.realpath(__file__))
        self.benign = frozenset(p for p in os.environ.get("SSM_GOLF_AUDIT_BENIGN_PROGRAMS", "").split(os.pathsep) if p)
        benign_re = os.environ.get("SSM_GOLF_AUDIT_BENIGN_RE")
        try:
            self.benign_re = re.compile(benign_re) if benign_re else None
        except re.error:
            self.benign_re = None
        self.read_roots = _split_roots(os.environ.get("SSM_GOLF_AUDIT_READ_ROOTS")) + _python_roots()
        self.write_roots = _split_roots(os.environ.get("SSM_GOLF_AUDIT_WRITE_ROOTS"))
        self.block_net = os.environ.get("SSM_GOLF_AUDIT_BLOCK_NET") == "1"
        self.own_names = {socket.gethostname()}
        self.seen: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {}
        self.busy = threading.local()

    def write(self, kind: str, **fields: object) -> None:
        record = {"t": round(time.time(), 3), "pid": os.getpid(), "kind": kind, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode("utf-8", "replace"))

    def hook(self, event: str, args: tuple) -> None:
        if event not in _WATCHED or getattr(self.busy, "on", False):
            return
        self.busy.on = True
        try:
            refusal = self.handle(event, args)
        except Exception as exc:  # an odd argument must not break the run; leave a trace instead
            self.write("hook_error", event=event, detail=repr(exc)[:200])
            refusal = None
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
        if event in ("os.remove", "os.rename", "os.link", "os.truncate", "os.rmdir", "shutil.rmtree"):
            return self.on_change(event, args)
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            return self.on_connect(event, args[1] if len(args) > 1 else None)
        if event.startswith("socket.gethostby") or event == "socket.getaddrinfo":
            return self.on_lookup(event, args[0])
        return self.on_spawn(event, args)

    def on_open(self, path: object, flags: object) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        writing = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        if real == self.log_path:
            self.write("tamper", path=self.log_path, op="open", target=real, write=writing)
            return "the audit log is not the script's to open"
        if writing and not _under(real, self.write_roots):
            self.once("write_outside", real)
            return f"writing {real} refused: the run may write only in its work dir, home and temp"
        elif not writing and not _under(real, self.read_roots):
            self.once("read_outside", real)
        return None

    def _path(self, path: object, dir_fd: object = None, follow: bool = False) -> str | None:
        """The real path an os call acts on (the last part not followed unless `follow`), or None if unknown."""
        try:
            if isinstance(path, int):
                return os.path.realpath(f"/proc/self/fd/{path}")
            text = os.fsdecode(path)  # type: ignore[arg-type]
            if not os.path.isabs(text) and isinstance(dir_fd, int):
                text = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text)
            if follow:
                return os.path.realpath(text)
            head, tail = os.path.split(os.path.abspath(text))
            return os.path.join(os.path.realpath(head), tail)
        except (TypeError, ValueError, OSError):
            return None

    def _is_log(self, path: object, dir_fd: object = None) -> bool:
        if isinstance(path, int):
            try:
                stat = os.fstat(path)
            except OSError:
                return False
            return (stat.st_dev, stat.st_ino) == self.log_id
        real = self._path(path, dir_fd, follow=True)
        return real is not None and (real == self.log_path or _same_file(real, self.log_id))

    def _holds_log(self, path: object, dir_fd: object = None) -> bool:
        """The path is the log or a folder above it (removing or renaming it takes the log with it)."""
        real = self._path(path, dir_fd)
        return real is not None and (real == self.log_path or _under(self.log_path, (real,)))

    def on_change(self, event: str, args: tuple) -> str | None:
        """Removal, rename, hard link or truncation: refused on the audit log and on the folders holding it."""
        if event == "os.truncate":
            hit = self._is_log(args[0])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            hit = self._holds_log(args[0], args[1] if len(args) > 1 else None)
        else:  # os.rename (rename, replace, renames), os.link: (src, dst, src_dir_fd, dst_dir_fd)
            src_fd = args[2] if len(args) > 2 else None
            dst_fd = args[3] if len(args) > 3 else None
            hit = self._holds_log(args[0], src_fd) or self._is_log(args[0], src_fd) or self._holds_log(args[1], dst_fd)
        if not hit:
            return None
        target = args[0] if isinstance(args[0], int) else self._path(args[0])
        key = (f"tamper:{event}", str(target))
        if key not in self.seen:
            self.seen.add(key)
            self.write("tamper", path=self.log_path, op=event, target=target)
        return f"{event} on the audit log or its folder is not the script's to do"

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
        self.network(event, repr(address))
        return f"network access refused ({event}); the run has no network" if self.block_net else None

    def on_lookup(self, event: str, host: object) -> str | None:
        name = os.fsdecode(host) if isinstance(host, (str, bytes)) else host
        if name in _LOCAL_HOSTS or name in self.own_names or _is_loopback(name):
            return None
        self.network(event, repr(name))
        return f"network access refused ({event}); the run has no network" if self.block_net else None

    def network(self, event: str, address: str) -> None:
        if ("network", event + address) not in self.seen:  # once per address: a retry loop adds nothing
            self.seen.add(("network", event + address))
            self.write("network", event=event, address=address, refused=self.block_net)

    def on_spawn(self, event: str, args: tuple) -> str | None:
        env: object = None
        if event == "subprocess.Popen":  # (executable, args, cwd, env)
            executable, argv = args[0], args[1]
            env = args[3] if len(args) > 3 else None
        elif event == "os.system":
            executable, argv = "/bin/sh", ["/bin/sh", "-c", args[0]]
        elif event == "os.spawn":  # (mode, path, args, env)
            executable, argv = args[1], args[2]
            env = args[3] if len(args) > 3 else None
        else:  # os.exec, os.posix_spawn: (path, argv, env)
            executable, argv = args[0], args[1]
            env = args[2] if len(args) > 2 else None
        argv_list = [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in _as_list(argv)]
        exe = os.fsdecode(executable) if executable is not None else (argv_list[0] if argv_list else "")
        name = os.path.basename(exe)
        if name.startswith("python"):
            why = self.unhooked(argv_list, os.environ if env is None else env)
            if why:
                self.write("spawn", event=event, executable=exe, argv=argv_list[:16], unhooked=why)
                return f"a Python child without the audit hook is refused ({why})"
        elif name in self.benign or (self.benign_re is not None and self.benign_re.match(name)):
            count = self.counts.get(name, 0) + 1
            self.counts[name] = count
            if count > _MAX_BENIGN_SPAWNS:
                if count == _MAX_BENIGN_SPAWNS + 1:
                    detail = f"more than {_MAX_BENIGN_SPAWNS} spawns of {name}; later ones are counted, not recorded"
                    self.write("truncated", detail=detail, program=name)
                return None
        self.write("spawn", event=event, executable=exe, argv=argv_list[:16])
        return None

    def unhooked(self, argv: list[str], env: object) -> str:
        """Why a Python child would start without this hook, or "" when it loads it like this process did."""
        flags = hook_defeating_flags(argv)
        if flags:
            return f"interpreter option -{flags} skips sitecustomize"
        if not hasattr(env, "get"):
            return ""
        get = env.get  # type: ignore[attr-defined]

        def value(key: str) -> str:
            for k in (key, key.encode()):
                try:
                    v = get(k)
                except (TypeError, ValueError, KeyError):
                    continue
                if isinstance(v, (str, bytes)):
                    return os.fsdecode(v)
            return ""

        if value("SSM_GOLF_AUDIT_LOG") != self.log_env:
            return "its environment drops SSM_GOLF_AUDIT_LOG"
        for entry in value("PYTHONPATH").split(os.pathsep):
            if not entry:
                continue
            real = os.path.realpath(entry)
            if real == self.hook_dir:
                return ""
            if any(os.path.exists(os.path.join(real, n)) for n in ("sitecustomize.py", "sitecustomize")):
                return f"another sitecustomize ({entry}) comes before the hook on PYTHONPATH"
        return "its PYTHONPATH drops the hook folder"


def _as_list(argv: object) -> list:
    if isinstance(argv, (str, bytes, os.PathLike)):
        return [argv]
    try:
        return list(argv)  # type: ignore[call-overload]
    except TypeError:
        return [argv]


def _same_file(path: str, file_id: tuple[int, int]) -> bool:
    """A hard link to the file (another name for the same inode)."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return False
    return (stat.st_dev, stat.st_ino) == file_id


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


if __name__ == "sitecustomize":  # as the site module loads it; the validator imports it for its parser only
    _install()
