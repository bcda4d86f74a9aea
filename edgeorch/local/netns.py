"""Real links for a local testbed: one network namespace per worker, a bridge between them, shaped uplinks.

Emulation on a worker paces its own outgoing activations in user space.
Where the machine allows it (root, iproute2, a kernel with network
namespaces and the ``tbf`` qdisc), a :class:`Testbed` instead gives every
worker a network stack of its own: a namespace with one veth interface,
attached to a bridge in the root namespace that also carries the control
plane's address. Traffic between two workers then crosses two real
interfaces, and ``set_uplink`` caps a node's outgoing traffic with a token
bucket (``tc qdisc ... tbf``) in its kernel, so every byte it sends —
activations, probes, heartbeats — is shaped, TCP included.

RTT is not shaped here: ``netem`` is not on this kernel; the worker's
emulated RTT stays in use for that. Everything a testbed makes carries its
own short id in its name and is removed by :meth:`Testbed.close`; a testbed
whose process died without closing it (SIGKILL) is removed by the next one.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import uuid

log = logging.getLogger(__name__)

QUEUE_LATENCY = "500ms"  # how long a packet may wait in the shaper before it is dropped
MIN_BURST_BYTES = 4096  # above one 1514-byte frame, small enough that a 32 KB probe sees the rate
BURST_S = 0.002  # otherwise 2 ms of traffic at the rate
OWNER = "edgeorch testbed of pid "  # the bridge's alias: whose testbed it is


class NetnsError(RuntimeError):
    """A namespace, interface or qdisc could not be made or changed."""


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def unavailable_reason() -> str | None:
    """Why a testbed cannot be made on this machine, or None when it can.

    Makes one, in small (a node joined to the bridge, a tbf on its uplink),
    and removes it again: what the machine refuses is what a testbed needs.
    """
    missing = _missing_prerequisite()
    if missing is not None:
        return missing
    try:
        with Testbed() as tb:
            tb.add_node("probe")
            tb.add_node("probe2")
            tb.set_uplink("probe", 10)
            _check_traffic(tb, "probe", "probe2")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a namespace, bridge and veth pair with a tbf qdisc: {exc}"
    return None


# One TCP exchange between two namespaces: a firewall that drops bridged traffic (Docker's
# FORWARD policy with bridge-nf-call-iptables) lets every setup step pass and only shows here.
_SERVE = (
    "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',0));s.listen(1);s.settimeout(5);"
    "print(s.getsockname()[1],flush=True);c,_=s.accept();c.sendall(b'ok');c.close()"
)
_CONNECT = "import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3);print(c.recv(2).decode())"


def _check_traffic(tb: Testbed, src: str, dst: str) -> None:
    """Raise NetnsError unless ``src`` reaches a TCP listener in ``dst`` across the bridge."""
    server = subprocess.Popen([*tb.exec_prefix(dst), sys.executable, "-c", _SERVE],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = (server.stdout.readline() if server.stdout else "").strip()
        if not port.isdigit():
            raise NetnsError(f"no listener in {dst}: {server.stderr.read() if server.stderr else ''}")
        got = subprocess.run([*tb.exec_prefix(src), sys.executable, "-c", _CONNECT, tb.nodes[dst][2], port],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        if got.stdout.strip() != "ok":
            raise NetnsError(f"no traffic from {src} to {dst} across the bridge: {got.stderr.strip()[-200:]}")
    finally:
        server.kill()
        server.wait(timeout=10)


def _missing_prerequisite() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not on PATH"
    return None


def tbf_args(mbps: float) -> list[str]:
    """The ``tbf`` parameters that cap a link at ``mbps`` Mbit/s."""
    if not mbps > 0:
        raise ValueError(f"a rate must be positive, not {mbps!r}")
    rate_bits = int(mbps * 1e6)
    burst = max(MIN_BURST_BYTES, int(rate_bits / 8 * BURST_S))
    return ["rate", f"{rate_bits}bit", "burst", str(burst), "latency", QUEUE_LATENCY]


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(w).network for w in _run(["ip", "-4", "-o", "addr", "show"]).split()
            if "/" in w and w[0].isdigit()]  # fmt: skip
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(100, 200)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet for a testbed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forward_rules(bridge: str, action: str) -> None:
    """Insert (``-I``) or delete (``-D``) the FORWARD rules that let the bridge's own traffic through.

    A running dockerd sets the FORWARD policy to DROP, and with bridge-nf-call-iptables
    traffic between two ports of a bridge is filtered there too; without these rules every
    request between two namespaces would vanish. No iptables on the machine: nothing filters.
    """
    if shutil.which("iptables") is None:
        return
    for direction in ("-i", "-o"):
        argv = ["iptables", "-w", "5", action, "FORWARD", direction, bridge, "-j", "ACCEPT"]
        if action == "-I":
            _run(argv)
        else:
            subprocess.run(argv, capture_output=True, timeout=30)


def remove_stale() -> list[str]:
    """Remove the testbeds of processes that are gone; returns their bridges' names."""
    removed = []
    for line in _run(["ip", "-o", "link", "show", "type", "bridge"]).splitlines():
        name = re.match(r"\d+: (eo[0-9a-f]{5}b)[:@]", line)
        owner = re.search(re.escape(OWNER) + r"(\d+)", line)
        if not name or not owner or _pid_alive(int(owner.group(1))):
            continue
        tb_id = name.group(1)[2:-1]
        for ns in _run(["ip", "netns", "list"]).split():
            if ns.startswith(f"eo{tb_id}-"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for iface in re.findall(rf"\d+: (eo{tb_id}h\d+)[:@]", _run(["ip", "-o", "link", "show"])):
            subprocess.run(["ip", "link", "del", iface], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", name.group(1)], capture_output=True, timeout=30)
        _forward_rules(name.group(1), "-D")
        removed.append(name.group(1))
        log.info("removed the testbed %s of a process that is gone", name.group(1))
    return removed


class Testbed:
    """A bridge with the control plane's address and one namespace per node.

    ``with Testbed() as tb: ip = tb.add_node("n1"); argv = tb.exec_prefix("n1") + [...]``.
    """

    def __init__(self) -> None:
        missing = _missing_prerequisite()
        if missing is not None:
            raise NetnsError(f"no network namespaces here: {missing}")
        remove_stale()
        self.id = uuid.uuid4().hex[:5]
        self.subnet = _free_subnet(random.Random())
        hosts = self.subnet.hosts()
        self.host_ip = str(next(hosts))  # the bridge: where the control plane listens
        self._addresses = hosts
        self.bridge = f"eo{self.id}b"
        self.nodes: dict[str, tuple[str, str, str]] = {}  # node -> (namespace, interface, address)
        self._count = 0
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "link", "set", self.bridge, "alias", f"{OWNER}{os.getpid()}"])
            _run(["ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            _forward_rules(self.bridge, "-I")
        except NetnsError:
            self.close()
            raise

    def add_node(self, node_id: str) -> str:
        """A namespace for ``node_id`` joined to the bridge; returns its address."""
        if node_id in self.nodes:
            return self.nodes[node_id][2]
        self._count += 1
        ns, host_if, node_if = self._names(self._count)
        address = str(next(self._addresses))
        self.nodes[node_id] = (ns, node_if, address)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if])
        _run(["ip", "link", "set", node_if, "netns", ns])
        _run(["ip", "link", "set", host_if, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", node_if])
        _run(["ip", "-n", ns, "link", "set", node_if, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return address

    def _names(self, index: int) -> tuple[str, str, str]:
        """(namespace, host-side interface, node-side interface) of the index-th node."""
        return f"eo{self.id}-{index}", f"eo{self.id}h{index}", f"eo{self.id}n{index}"

    def exec_prefix(self, node_id: str) -> list[str]:
        """The argv prefix that runs a command inside the node's namespace."""
        return ["ip", "netns", "exec", self.nodes[node_id][0]]

    def set_uplink(self, node_id: str, mbps: float | None) -> None:
        """Cap what the node sends at ``mbps`` Mbit/s (None: no cap)."""
        ns, iface, _ = self.nodes[node_id]
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        if mbps is None:
            subprocess.run([*tc, "del", "dev", iface, "root"], capture_output=True, timeout=30)
            return
        _run([*tc, "replace", "dev", iface, "root", "tbf", *tbf_args(mbps)])
        log.info("uplink of %s capped at %g Mbit/s", node_id, mbps)

    def uplink(self, node_id: str) -> str:
        """``tc qdisc show`` of the node's interface (what shapes it now)."""
        ns, iface, _ = self.nodes[node_id]
        return _run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", iface]).strip()

    def close(self) -> None:
        """Remove every namespace (their veth pairs go with them) and the bridge; safe to call twice."""
        for ns, _, _ in self.nodes.values():
            # The host end first: a namespace's own interfaces go only once the kernel has torn it
            # down, which happens after `ip netns del` returns.
            host_if = self._names(int(ns.rsplit("-", 1)[1]))[1]
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.nodes.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        _forward_rules(self.bridge, "-D")

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
