"""Hosts for `runner launch` tests on this machine: scripts/fake_hosts.sh's network namespaces, each
with its own sshd (a generated key, an ssh config only these tests use), joined by a bridge.

    hosts = FakeHosts.start(2)       # or the `fake_hosts` fixture; FakeHosts.unavailable() says why not
    hosts.ips                        # ["10.78.N.1", "10.78.N.2"]
    hosts.env                        # PATH with the ssh that reads the fixture's config (mlx.launch's too)
    hosts.cut(1) / hosts.mend(1)     # host 1's link down / up
    with hosts.hidden(1, folder):    # folder empty on host 1 (a tmpfs in its sshd's mount namespace)
    hosts.processes(1)               # what runs on host 1 besides sshd
    hosts.close()

The hosts share this machine's files and processes; only the network, the hostname and the mounts
are their own. Needs root, iproute2, util-linux and openssh-server (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fake_hosts.sh"


def _fails(*argv: str) -> str | None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


class FakeHosts:
    def __init__(self, folder: Path, prefix: str, subnet: str, count: int):
        self.folder, self.prefix, self.subnet, self.count = folder, prefix, subnet, count
        self.names = [f"{prefix}-h{i}" for i in range(1, count + 1)]      # namespaces and ssh names
        self.ips = [f"{subnet}.{i}" for i in range(1, count + 1)]
        self.nobody = f"{subnet}.99"                                      # on the bridge, no host there
        self.env = {**os.environ, "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}

    @staticmethod
    def unavailable() -> str | None:
        """Why fake hosts cannot be made here, or None."""
        if os.geteuid() != 0:
            return "fake hosts need root (network namespaces, sshd)"
        for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                return f"fake hosts need {tool}"
        if not os.access("/usr/sbin/sshd", os.X_OK):
            return "fake hosts need sshd (apt-get install openssh-server)"
        probe = f"rnprobe{os.getpid()}"
        why = _fails("ip", "netns", "add", probe)
        if why is not None:
            return f"cannot make a network namespace here ({why})"
        _fails("ip", "netns", "delete", probe)
        return None

    @classmethod
    def start(cls, count: int) -> "FakeHosts":
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        third = next(n for n in [os.getpid() % 200 + 20, *range(20, 250)] if f" 10.78.{n}." not in used)
        hosts = cls(Path(tempfile.mkdtemp(prefix="runner-fake-hosts-")), f"rt{os.getpid() % 100000}",
                    f"10.78.{third}", count)
        done = subprocess.run([str(SCRIPT), "up", str(count), str(hosts.folder), hosts.prefix, hosts.subnet],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            hosts.close()
            raise RuntimeError(f"fake_hosts.sh up failed: {done.stderr.strip()}")
        return hosts

    def close(self) -> None:
        """Stops every sshd and whatever is left on the hosts; removes the namespaces and the bridge."""
        if (self.folder / "hosts").exists():
            subprocess.run([str(SCRIPT), "down", str(self.folder)], capture_output=True, timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- on one host (1-based, as the namespaces are named) ----------------------------------

    def sshd_pid(self, host: int) -> int:
        return int((self.folder / self.names[host - 1] / "sshd.pid").read_text())

    def processes(self, host: int) -> list[psutil.Process]:
        """What runs on `host` besides sshd (its listener and its sessions)."""
        pids = subprocess.run(["ip", "netns", "pids", self.names[host - 1]], capture_output=True,
                              text=True).stdout.split()
        found = []
        for pid in pids:
            try:
                process = psutil.Process(int(pid))
                if not process.cmdline()[:1] or not process.cmdline()[0].startswith("sshd"):
                    found.append(process)
            except psutil.NoSuchProcess:
                continue
        return found

    def ranks(self, host: int) -> list[psutil.Process]:
        return [p for p in self.processes(host) if "runner_mlx.rank" in " ".join(p.cmdline())]

    def cut(self, host: int) -> None:
        subprocess.run(["ip", "link", "set", self.names[host - 1], "down"], check=True)

    def mend(self, host: int) -> None:
        subprocess.run(["ip", "link", "set", self.names[host - 1], "up"], check=True)

    def closed_port_alias(self, host: int) -> str:
        """An ssh name for `host` on a port nobody listens on: ssh is refused there."""
        alias = f"{self.prefix}-closed{host}"
        config = self.folder / "ssh_config"
        if f"Host {alias}\n" not in config.read_text():
            with config.open("a") as out:
                out.write(f"Host {alias}\n  HostName {self.ips[host - 1]}\n  Port 9\n")
        return alias

    def in_namespace(self, host: int) -> list[str]:
        """The prefix that runs a command on `host`'s network (runner launch from that host)."""
        return ["ip", "netns", "exec", self.names[host - 1]]

    @contextlib.contextmanager
    def mounted(self, host: int, *mount_args: str, target: Path):
        """`mount MOUNT_ARGS TARGET` in `host`'s mount namespace (what its ssh sessions see), undone after."""
        enter = ["nsenter", "-t", str(self.sshd_pid(host)), "-m"]
        subprocess.run([*enter, "mount", *mount_args, str(target)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run([*enter, "umount", "-l", str(target)], check=True, capture_output=True)

    def hidden(self, host: int, folder: Path):
        """`folder` is empty on `host`: as if it had never been copied there."""
        return self.mounted(host, "-t", "tmpfs", "runner-test", target=folder)

    def replaced(self, host: int, folder: Path, other: Path):
        """`folder` on `host` shows what `other` holds here."""
        return self.mounted(host, "--bind", str(other), target=folder)


@pytest.fixture(scope="module")
def fake_hosts():
    """Two hosts over ssh for the tests of a module; skipped, with the reason, where they cannot be made."""
    why = FakeHosts.unavailable()
    if why is not None:
        pytest.skip(why)
    try:
        hosts = FakeHosts.start(2)
    except RuntimeError as error:        # e.g. namespaces allowed, but not a mount namespace for sshd
        pytest.skip(f"cannot make fake hosts here: {error}")
    try:
        yield hosts
    finally:
        hosts.close()
