"""A throwaway OpenSSH server on a loopback ephemeral port (Debian's
openssh-server): generated host key, a test user key, `authorized_keys` in a
temp dir, `sshd -D -e -f CONFIG` (no daemon, logs on stderr), `UsePAM no`,
`StrictModes no`. As root (CI) it runs with privilege separation (it needs
`/run/sshd`, made here if missing) and lets the key log in as root; as
another user it runs unprivileged and logs that user in.

sshd cannot report an ephemeral port, so a free one is picked right before
the start and retried when taken; readiness is its `Server listening on`
log line (bounded wait)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path

from .peers import free_tcp_port
from .procs import Proc, ProcessGroup

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be run by absolute path

CONFIG = """\
ListenAddress 127.0.0.1:{port}
HostKey {dir}/host_ed25519
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
"""


class Sshd:
    def __init__(self, proc: Proc, port: int, user: str, dir: Path):
        self.proc, self.port, self.user, self.dir = proc, port, user, dir

    @property
    def user_key(self) -> Path:
        return self.dir / "user_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def ssh_argv(self, *extra: str, host: str = "127.0.0.1") -> list[str]:
        """ssh with only this server's key trusted (StrictHostKeyChecking yes),
        the test key, no config file, batch mode."""
        return ["ssh", "-F", "/dev/null", "-i", str(self.user_key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR",
                "-p", str(self.port), *extra, f"{self.user}@{host}"]


def unusable_reason() -> str | None:
    """Why sshd cannot run here, or None."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found: run scripts/install-test-deps.sh (openssh-server)"
    if not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "ssh / ssh-keygen not found: run scripts/install-test-deps.sh (openssh-client)"
    return None


def _keygen(path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wsgate-e2e", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def start_sshd(procs: ProcessGroup, d: Path, timeout: float = 15.0) -> Sshd:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    user = getpass.getuser()
    _keygen(d / "host_ed25519")
    _keygen(d / "user_ed25519")
    (d / "authorized_keys").write_text((d / "user_ed25519.pub").read_text())
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_pub = (d / "host_ed25519.pub").read_text().split()
    last = ""
    for attempt in range(5):
        port = free_tcp_port()
        conf = d / f"sshd_config.{attempt}"
        conf.write_text(CONFIG.format(port=port, dir=d, user=user))
        # The known_hosts line for a non-22 port reads [HOST]:PORT.
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        p = procs.start([SSHD, "-D", "-e", "-f", str(conf)], "sshd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = p.stderr_text()
            if "Server listening on 127.0.0.1 port" in log:
                return Sshd(p, port, user, d)
            if p.popen.poll() is not None:
                break
            time.sleep(0.05)  # readiness poll of its log, bounded
        last = p.stderr_text()
        p.stop()
        if "Address already in use" not in last:
            break
    raise AssertionError(f"sshd did not start:\n{last}")
