#!/usr/bin/python3
"""`scripts/lab`: stands up, inspects, breaks and removes the RKE2 lab.

Each node is a real OpenSSH sshd in its own mount and UTS namespaces on its own loopback
address, with a Rocky 9 view of the system made of overlays and bind mounts that exist only
inside that namespace (/etc and /var/lib are overlays whose upper layers are the node's
directories, /usr/local/bin holds the lab's tools). The lab also runs the registration address
(a TCP balancer for :9345 and :6443 over the servers that answer) and a Proxmox VE API over TLS
whose snapshots are copies of the nodes' upper layers. Only 127.0.0.0/8 is ever used.
"""

import argparse
import asyncio
import hashlib
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

import s3  # lab/s3.py, beside this file
import vsphere  # lab/vsphere.py: the vCenter view of the same VMs

HERE = os.path.dirname(os.path.realpath(__file__))
MARKER = ".rke2-lab"
NODE_TOOLS = ["rke2", "rke2-install", "curl", "systemctl", "dnf", "yum", "rpm", "firewall-cmd", "getenforce",
              "nmcli", "hostnamectl", "systemd-detect-virt", "timedatectl", "lsblk", "ss", "needs-restarting",
              "iscsi-iname", "rke2-killall.sh", "rke2-uninstall.sh", "systemd-run", "reboot", "shutdown", "etcdctl"]
OS_RELEASE = """NAME="Rocky Linux"
VERSION="9.6 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.6"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.6 (Blue Onyx)"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:rocky:rocky:9::baseos"
HOME_URL="https://rockylinux.org/"
"""
API_NAME = "rke2-api.lab.internal"
# What the lab's Rocky repositories offer over the image's packages (node.py BASE_PACKAGES):
# a kernel and openssl-libs (core: needs-restarting -r asks for a reboot) and two that are not.
UPDATES = {"kernel-core": "5.14.0-570.42.2.el9_6", "openssl-libs": "3.2.2-6.el9_6.1",
           "vim-minimal": "8.2.2637-21.el9_6.2", "tzdata": "2025b-1.el9"}
PVE_TOKEN_ID = "runbook@pve!lab"
PVE_HOSTS = ["pve1", "pve2", "pve3"]


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def load(lab_dir):
    with open(os.path.join(lab_dir, "lab.json")) as f:
        return json.load(f)


def save(lab_dir, lab):
    tmp = os.path.join(lab_dir, "lab.json.tmp")
    with open(tmp, "w") as f:
        json.dump(lab, f, indent=1)
    os.replace(tmp, os.path.join(lab_dir, "lab.json"))


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (OSError, ValueError):
        return False


def ns_pids(ns_id, uts_id=None):
    """Every process whose mount namespace is `ns_id` and UTS namespace `uts_id` (the node's
    processes). Both: a namespace's id is reused once it is gone, and other tests make mount
    namespaces of their own all the time (never a UTS one); a node has both."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/ns/mnt") == ns_id and (
                        uts_id is None or os.readlink(f"/proc/{p}/ns/uts") == uts_id):
                    out.append(int(p))
            except OSError:
                pass
    return out


def port_open(ip, port, timeout=0.5):
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ nodes


def node_dir(lab_dir, name):
    return os.path.join(lab_dir, "nodes", name)


def prepare_node(lab_dir, lab, n):
    d = node_dir(lab_dir, n["name"])
    for sub in ("etc", "etc.work", "varlib", "varlib.work", "bin", "run"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    etc = os.path.join(d, "etc")
    with open(os.path.join(etc, "os-release"), "w") as f:
        f.write(OS_RELEASE)
    with open(os.path.join(etc, "redhat-release"), "w") as f:
        f.write("Rocky Linux release 9.6 (Blue Onyx)\n")
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(n["name"] + "\n")  # cloud-init names the clone after the VM
    hosts = ["127.0.0.1 localhost localhost.localdomain", f"{lab['lb_ip']} {API_NAME}"]
    hosts += [f"{m['ip']} {m['name']}" for m in lab["nodes"] if m.get("ip") and m.get("state") != "lost"]
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write("\n".join(hosts) + "\n")
    os.makedirs(os.path.join(etc, "NetworkManager", "conf.d"), exist_ok=True)
    with open(os.path.join(etc, "lab-node.json"), "w") as f:
        json.dump({"name": n["name"], "ip": n["ip"], "role": n["role"], "lab_dir": lab_dir,
                   "tls_cert": os.path.join(lab_dir, "tls", "cert.pem"), "tls_key": os.path.join(lab_dir, "tls", "key.pem"),
                   "disk_gb": 40 if n["role"] == "servers" else 60,
                   "available_versions": lab["versions"], "stable_version": lab["versions"][0],
                   **lab["timing"]}, f, indent=1)
    with open(os.path.join(d, "meminfo"), "w") as f:
        f.write("MemTotal:        7990000 kB\nMemFree:         6000000 kB\nMemAvailable:    7000000 kB\n"
                "SwapTotal:             0 kB\nSwapFree:              0 kB\n")
    with open(os.path.join(d, "swaps"), "w") as f:
        f.write("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    for t in NODE_TOOLS:
        link = os.path.join(d, "bin", t)
        if not os.path.lexists(link):
            os.symlink(os.path.join(HERE, "node.py"), link)
    for t in ("kubectl", "helm"):
        link = os.path.join(d, "bin", t)
        if not os.path.lexists(link):
            os.symlink(os.path.join(HERE, "kubectl.py"), link)
    with open(os.path.join(d, "sshd_config"), "w") as f:
        f.write(f"""ListenAddress {n['ip']}:{lab['ssh_port']}
HostKey {lab_dir}/ssh/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {lab_dir}/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 50
Subsystem sftp internal-sftp
""")
    with open(os.path.join(d, "boot.sh"), "w") as f:
        f.write(f"""#!/bin/sh
# Runs inside the node's new mount + UTS namespaces: the node's view, then sshd, then an anchor.
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc,workdir={d}/etc.work /etc
mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/varlib,workdir={d}/varlib.work /var/lib
mount --bind {d}/bin /usr/local/bin
mount --bind {d}/meminfo /proc/meminfo
mount --bind {d}/swaps /proc/swaps
mount -t tmpfs -o size=1m lab-selinux /sys/fs
mkdir -p /sys/fs/selinux && echo 1 > /sys/fs/selinux/enforce
hostname "$(cat /etc/hostname)"
# A boot: a new boot id (the kubelet reports it as nodeInfo.bootID) and its time (needs-restarting).
mkdir -p /var/lib/lab-node
cat /proc/sys/kernel/random/uuid > /var/lib/lab-node/boot_id
date +%s > /var/lib/lab-node/booted-at
mkdir -p /run/sshd
/usr/sbin/sshd -f {d}/sshd_config -E {d}/sshd.log
exec sleep infinity
""")


def boot_node(lab_dir, lab, n, start_services=True):
    d = node_dir(lab_dir, n["name"])
    try:
        os.remove(os.path.join(d, "sshd.pid"))
    except OSError:
        pass
    p = subprocess.Popen(["unshare", "--mount", "--uts", "--", "/bin/sh", os.path.join(d, "boot.sh")],
                         stdin=subprocess.DEVNULL, stdout=open(os.path.join(d, "boot.log"), "ab"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    end = time.time() + 20
    while time.time() < end and not port_open(n["ip"], lab["ssh_port"]):
        if p.poll() is not None:
            raise SystemExit(f"lab: node {n['name']} did not boot; see {d}/boot.log")
        time.sleep(0.1)
    if not port_open(n["ip"], lab["ssh_port"]):
        raise SystemExit(f"lab: sshd of {n['name']} does not answer on {n['ip']}:{lab['ssh_port']}; see {d}/sshd.log")
    n["anchor"] = p.pid
    n["ns"] = os.readlink(f"/proc/{p.pid}/ns/mnt")
    n["uts"] = os.readlink(f"/proc/{p.pid}/ns/uts")
    n["state"] = "running"
    if start_services:
        # A VM boot starts the enabled units.
        units = os.path.join(d, "varlib", "lab-node", "units.json")
        try:
            with open(units) as f:
                enabled = [u for u, v in json.load(f).items() if v.get("enabled") and u.startswith("rke2-")]
        except (OSError, ValueError):
            enabled = []
        for u in enabled:
            node_exec(n, ["systemctl", "start", "--no-block", u], check=False)  # a boot waits for no unit


# ------------------------------------------------------------------------------------- VMs
# One code path for a VM cloned from the template: `add-node` and the Proxmox API's clone,
# config and start routes (which the Terraform stand-in, lab/terraform.py, drives) all use these.

TEMPLATE = {"vmid": 9000, "name": "rocky9-rke2", "pve_node": PVE_HOSTS[0]}


def vm_clone(lab_dir, lab, name, vmid, pve_node):
    """A full clone of the template: a stopped VM with the template's config, no address yet
    (cloud-init's ipconfig0 decides it) and nothing of RKE2. A lost VM's leftovers under the
    same name or vmid are gone first (its disks were lost with it)."""
    for m in [m for m in lab["nodes"] if m.get("state") == "lost" and (m["name"] == name or m["vmid"] == vmid)]:
        lab["nodes"].remove(m)
    if any(m["name"] == name for m in lab["nodes"]):
        raise RuntimeError(f"a VM named {name} exists already")
    shutil.rmtree(node_dir(lab_dir, name), ignore_errors=True)
    n = {"name": name, "ip": None, "role": None, "vmid": int(vmid), "pve_node": pve_node, "state": "stopped",
         "config": {"name": name, "cores": 2, "memory": 4096, "sockets": 1, "ostype": "l26", "agent": "1",
                    "scsi0": "local-lvm:vm-%d-disk-0,size=40G" % int(vmid), "net0": "virtio,bridge=vmbr0",
                    "ide2": "local-lvm:vm-%d-cloudinit,media=cdrom" % int(vmid)}}
    lab["nodes"].append(n)
    return n


def vm_configure(lab, n, cfg):
    """`config` POST/PUT: the keys PVE takes. ipconfig0 (`ip=A/24,gw=G`) is the address the
    guest comes up with; the tags say the role (the module tags each VM `servers` or `agents`)."""
    sub = lab["subnet"]
    if "ipconfig0" in cfg:
        fields = dict(f.split("=", 1) for f in str(cfg["ipconfig0"]).split(",") if "=" in f)
        ip = fields.get("ip", "").split("/")[0]
        if not ip.startswith(sub + ".") or not ip.rsplit(".", 1)[1].isdigit() or not 2 <= int(ip.rsplit(".", 1)[1]) <= 254:
            raise ValueError(f"ipconfig0: address '{fields.get('ip', '')}' is outside the lab's network {sub}.0/24")
        taken = [m["name"] for m in lab["nodes"] if m.get("ip") == ip and m is not n and m.get("state") != "lost"]
        if taken or ip in (lab["lb_ip"], lab["pve_ip"]):
            raise ValueError(f"ipconfig0: address {ip} is in use ({', '.join(taken) or 'the lab'})")
        n["ip"] = ip
    if "tags" in cfg:
        tags = str(cfg["tags"]).replace(",", ";").split(";")
        n["role"] = "servers" if "servers" in tags else "agents" if "agents" in tags else n.get("role")
    for k, v in cfg.items():
        if k in ("delete", "digest", "node", "vmid"):
            continue
        n.setdefault("config", {})[k] = v
    for k in str(cfg.get("delete", "")).split(","):
        n.get("config", {}).pop(k.strip(), None)


def vm_start(lab_dir, lab, n):
    """Power on: the first boot of a clone writes its system (cloud-init) and its host key
    into the lab's known_hosts, then sshd and the enabled units come up."""
    if n.get("state") == "running":
        return
    if not n.get("ip"):
        raise RuntimeError(f"VM {n['vmid']} has no address: set ipconfig0 first")
    if not n.get("role"):
        n["role"] = "servers" if "size=40G" in str(n.get("config", {}).get("scsi0", "")) else "agents"
    if not os.path.exists(os.path.join(node_dir(lab_dir, n["name"]), "etc", "os-release")):
        prepare_node(lab_dir, lab, n)
        ssh = os.path.join(lab_dir, "ssh")
        hostpub = open(os.path.join(ssh, "host_ed25519.pub")).read().split()[:2]
        host = n["ip"] if lab["ssh_port"] == 22 else f"[{n['ip']}]:{lab['ssh_port']}"
        with open(os.path.join(ssh, "known_hosts")) as f:
            known = f.read()
        if f"{host} {hostpub[0]} {hostpub[1]}" not in known.splitlines():
            with open(os.path.join(ssh, "known_hosts"), "a") as f:
                f.write(f"{host} {hostpub[0]} {hostpub[1]}\n")
    if port_open(n["ip"], lab["ssh_port"], 0.2):
        raise RuntimeError(f"{n['ip']}:{lab['ssh_port']} is already taken")
    boot_node(lab_dir, lab, n)


def vm_stop(n):
    """Power off (hard stop, as `qm stop`)."""
    if n.get("state") in ("running", "frozen"):
        if n.get("state") == "frozen":
            kill_node(n, signal.SIGCONT)
        kill_node(n)
    n["state"] = "stopped"


def vm_destroy(lab_dir, lab, n):
    """`qm destroy`: the VM and its disks; refused while it runs, as PVE does."""
    if n.get("state") in ("running", "frozen"):
        raise RuntimeError(f"VM {n['vmid']} is running - destroy failed")
    lab["nodes"].remove(n)
    shutil.rmtree(node_dir(lab_dir, n["name"]), ignore_errors=True)
    shutil.rmtree(os.path.join(lab_dir, "pve", str(n["vmid"])), ignore_errors=True)


def node_exec(n, cmd, check=True):
    return subprocess.run(["nsenter", "-t", str(n["anchor"]), "-m", "-u", "--",
                           "env", "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + cmd,
                          capture_output=True, text=True, check=check)


def node_flag(n, name, on):
    path = f"/var/lib/lab-node/{name}"
    node_exec(n, ["sh", "-c", f"mkdir -p /var/lib/lab-node && touch {path}" if on else f"rm -f {path}"])


def node_alive(n):
    """Whether the node's anchor still holds the node's namespace."""
    try:
        return os.readlink(f"/proc/{n['anchor']}/ns/mnt") == n["ns"]
    except (OSError, KeyError):
        return False


def kill_node(n, sig=signal.SIGKILL, check=True):
    if not n.get("ns"):
        return
    # Only while the node's anchor still holds that namespace: once a node is gone its
    # namespace id may be reused by the kernel for another node's (even another lab's), and
    # killing by a stale id kills that one.
    if check and not node_alive(n):
        return
    for _ in range(20):
        pids = [p for p in ns_pids(n["ns"], n.get("uts")) if p != os.getpid()]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        if sig != signal.SIGKILL:
            return
        time.sleep(0.1)


# ------------------------------------------------------------------------------ balancer


async def lb_main(lab_dir):
    lab = load(lab_dir)
    rr = itertools.count()

    async def pipe(r, w):
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                w.close()
            except Exception:
                pass

    def handler(port):
        async def handle(cr, cw):
            servers = [n for n in load(lab_dir)["nodes"] if n["role"] == "servers" and n.get("state") == "running"]
            start = next(rr)
            for i in range(len(servers)):
                n = servers[(start + i) % len(servers)]
                try:
                    sr, sw = await asyncio.wait_for(asyncio.open_connection(n["ip"], port), 1.0)
                except (OSError, asyncio.TimeoutError):
                    continue
                await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
                return
            cw.close()
        return handle

    srvs = [await asyncio.start_server(handler(p), lab["lb_ip"], p) for p in (9345, 6443)]
    await asyncio.gather(*(s.serve_forever() for s in srvs))


# ---------------------------------------------------------------------------------- proxmox


class Pve:
    def __init__(self, lab_dir):
        self.lab_dir = lab_dir
        self.tasks = {}
        self.lock = threading.Lock()
        self.seq = itertools.count(1)

    def node_by_vmid(self, vmid):
        """The VM `vmid` as the hypervisor knows it (a lost VM is gone, disks and config)."""
        for n in load(self.lab_dir)["nodes"]:
            if str(n["vmid"]) == str(vmid) and n.get("state") != "lost":
                return n
        return None

    def snapdir(self, vmid, snap=None):
        d = os.path.join(self.lab_dir, "pve", str(vmid))
        return os.path.join(d, snap) if snap else d

    def task(self, pve_node, kind, vmid, fn):
        upid = f"UPID:{pve_node}:{os.getpid():08X}:{next(self.seq):08X}:{int(time.time()):08X}:{kind}:{vmid}:{PVE_TOKEN_ID}:"
        self.tasks[upid] = {"status": "running"}
        delay = float(load(self.lab_dir)["timing"].get("pve_task_seconds", 1))

        def work():
            time.sleep(delay)
            try:
                with self.lock:
                    fn()
                self.tasks[upid] = {"status": "stopped", "exitstatus": "OK"}
            except Exception as e:  # the task log says what went wrong, as PVE's does
                self.tasks[upid] = {"status": "stopped", "exitstatus": str(e)}

        threading.Thread(target=work, daemon=True).start()
        return upid

    def snapshot(self, vmid, snap):
        n = self.node_by_vmid(vmid)
        d = self.snapdir(vmid, snap)
        os.makedirs(d)
        src = node_dir(self.lab_dir, n["name"])
        for sub in ("etc", "varlib"):
            subprocess.run(["cp", "-a", os.path.join(src, sub), os.path.join(d, sub)], check=True)
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"name": snap, "snaptime": int(time.time())}, f)

    def rollback(self, vmid, snap):
        lab = load(self.lab_dir)
        n = [m for m in lab["nodes"] if str(m["vmid"]) == str(vmid)][0]
        kill_node(n)
        src = node_dir(self.lab_dir, n["name"])
        for sub in ("etc", "varlib"):
            shutil.rmtree(os.path.join(src, sub))
            subprocess.run(["cp", "-a", os.path.join(self.snapdir(vmid, snap), sub), os.path.join(src, sub)], check=True)
            shutil.rmtree(os.path.join(src, sub + ".work"), ignore_errors=True)
            os.makedirs(os.path.join(src, sub + ".work"))
        n["state"] = "stopped"
        save(self.lab_dir, lab)

    def migrate(self, vmid, target, online):
        lab = load(self.lab_dir)
        n = [m for m in lab["nodes"] if str(m["vmid"]) == str(vmid)][0]
        if n.get("state") == "running" and not online:
            raise RuntimeError("VM is running - use online migration (online=1) or shut it down first")
        # An online migration moves the running VM: its processes and sockets stay as they are.
        n["pve_node"] = target
        save(self.lab_dir, lab)

    def shutdown(self, vmid):
        """ACPI shutdown: the guest stops its services, then powers off."""
        lab = load(self.lab_dir)
        n = [m for m in lab["nodes"] if str(m["vmid"]) == str(vmid)][0]
        if n.get("state") == "running" and node_alive(n):
            node_exec(n, ["systemctl", "stop", "rke2-server", "rke2-agent"], check=False)
            kill_node(n, signal.SIGTERM, check=False)
            time.sleep(0.5)
            kill_node(n, check=False)
        n["state"] = "stopped"
        save(self.lab_dir, lab)

    def vm(self, lab, vmid):
        return [m for m in lab["nodes"] if str(m["vmid"]) == str(vmid) and m.get("state") != "lost"][0]

    def start(self, vmid):
        lab = load(self.lab_dir)
        vm_start(self.lab_dir, lab, self.vm(lab, vmid))
        save(self.lab_dir, lab)

    def stop(self, vmid):
        lab = load(self.lab_dir)
        vm_stop(self.vm(lab, vmid))
        save(self.lab_dir, lab)

    def clone(self, name, newid, target):
        lab = load(self.lab_dir)
        vm_clone(self.lab_dir, lab, name, int(newid), target)
        save(self.lab_dir, lab)

    def configure(self, vmid, cfg):
        lab = load(self.lab_dir)
        vm_configure(lab, self.vm(lab, vmid), cfg)
        save(self.lab_dir, lab)

    def destroy(self, vmid):
        lab = load(self.lab_dir)
        vm_destroy(self.lab_dir, lab, self.vm(lab, vmid))
        save(self.lab_dir, lab)

    def nextid(self):
        used = {int(m["vmid"]) for m in load(self.lab_dir)["nodes"] if m.get("state") != "lost"} | {TEMPLATE["vmid"]}
        return next(v for v in itertools.count(100) if v not in used)


def pve_handler(pve, secret):
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, data, msg=None):
            body = json.dumps({"data": data, **({"message": msg} if msg else {})}).encode()
            self.send_response(status, msg)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def params(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n).decode() if n else ""
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
            if raw.strip().startswith("{"):
                q.update(json.loads(raw))
            else:
                q.update(dict(urllib.parse.parse_qsl(raw)))
            return q

        def route(self, method):
            auth = self.headers.get("Authorization") or ""
            if auth != f"PVEAPIToken={PVE_TOKEN_ID}={secret}":
                return self.reply(401, None, "authentication failure")
            path = urllib.parse.urlparse(self.path).path.rstrip("/").split("/")
            if path[:3] != ["", "api2", "json"]:
                return self.reply(404, None, "not found")
            p = path[3:]
            q = self.params()
            if p == ["version"]:
                return self.reply(200, {"version": "8.4.1", "release": "8.4", "repoid": "lab"})
            if len(p) >= 4 and p[0] == "nodes" and p[2] == "tasks" and p[-1] == "status":
                t = pve.tasks.get(urllib.parse.unquote(p[3]))
                if not t:
                    return self.reply(404, None, "no such task")
                return self.reply(200, {"upid": p[3], **t})
            if p == ["nodes"]:
                return self.reply(200, [{"node": h, "status": "online", "type": "node"} for h in PVE_HOSTS])
            if p == ["cluster", "resources"]:
                vms = [{"id": f"qemu/{n['vmid']}", "vmid": n["vmid"], "name": n["name"], "type": "qemu",
                        "node": n.get("pve_node", PVE_HOSTS[0]),
                        "status": "running" if n.get("state") in ("running", "frozen") else "stopped"}
                       for n in load(pve.lab_dir)["nodes"] if n.get("state") != "lost"]
                vms.append({"id": f"qemu/{TEMPLATE['vmid']}", "vmid": TEMPLATE["vmid"], "name": TEMPLATE["name"],
                            "type": "qemu", "node": TEMPLATE["pve_node"], "status": "stopped", "template": 1})
                hosts = [{"id": f"node/{h}", "node": h, "type": "node", "status": "online"} for h in PVE_HOSTS]
                kind = q.get("type")
                return self.reply(200, vms if kind == "vm" else hosts if kind == "node" else hosts + vms)
            if p == ["cluster", "nextid"]:
                if q.get("vmid"):
                    if pve.node_by_vmid(q["vmid"]) or str(q["vmid"]) == str(TEMPLATE["vmid"]):
                        return self.reply(400, None, f"Parameter verification failed. vmid: VM {q['vmid']} already exists")
                    return self.reply(200, str(q["vmid"]))
                return self.reply(200, str(pve.nextid()))
            if len(p) >= 4 and p[0] == "nodes" and p[2] == "qemu" and p[3] == str(TEMPLATE["vmid"]):
                return self.template(method, p[1], p[4:], q)
            if len(p) == 4 and p[0] == "nodes" and p[2] == "qemu" and method == "DELETE":
                node, vmid = p[1], p[3]
                n = pve.node_by_vmid(vmid)
                if not n or n.get("pve_node", PVE_HOSTS[0]) != node:
                    return self.reply(500, None, f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
                if n.get("state") in ("running", "frozen"):
                    return self.reply(500, None, f"VM {vmid} is running - destroy failed")
                return self.reply(200, pve.task(node, "qmdestroy", vmid, lambda: pve.destroy(vmid)))
            if len(p) >= 4 and p[0] == "nodes" and p[2] == "qemu":
                node, vmid = p[1], p[3]
                if not pve.node_by_vmid(vmid):
                    return self.reply(500, None, f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
                rest = p[4:]
                here = pve.node_by_vmid(vmid).get("pve_node", PVE_HOSTS[0])
                if rest in (["migrate"], ["status", "shutdown"]) and node != here:
                    return self.reply(500, None, f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
                if rest == ["migrate"] and method == "POST":
                    target = q.get("target", "")
                    if target not in PVE_HOSTS:
                        return self.reply(400, None, f"Parameter verification failed. target: no such cluster node '{target}'")
                    if target == node:
                        return self.reply(500, None, f"target is local node '{node}'")
                    online = str(q.get("online", "0")) == "1"
                    return self.reply(200, pve.task(node, "qmigrate", vmid, lambda: pve.migrate(vmid, target, online)))
                if rest == ["status", "shutdown"] and method == "POST":
                    return self.reply(200, pve.task(node, "qmshutdown", vmid, lambda: pve.shutdown(vmid)))
                if rest == ["snapshot"] and method == "GET":
                    d = pve.snapdir(vmid)
                    snaps = sorted(os.listdir(d)) if os.path.isdir(d) else []
                    return self.reply(200, [json.load(open(os.path.join(d, s, "meta.json"))) for s in snaps]
                                      + [{"name": "current", "description": "You are here!"}])
                if rest == ["snapshot"] and method == "POST":
                    snap = q.get("snapname", "")
                    if not snap:
                        return self.reply(400, None, "Parameter verification failed. snapname: property is missing")
                    if os.path.exists(pve.snapdir(vmid, snap)):
                        return self.reply(500, None, f"snapshot name '{snap}' already used")
                    return self.reply(200, pve.task(node, "qmsnapshot", vmid, lambda: pve.snapshot(vmid, snap)))
                if len(rest) == 3 and rest[0] == "snapshot" and rest[2] == "rollback" and method == "POST":
                    if not os.path.exists(pve.snapdir(vmid, rest[1])):
                        return self.reply(500, None, f"snapshot '{rest[1]}' does not exist")
                    return self.reply(200, pve.task(node, "qmrollback", vmid, lambda: pve.rollback(vmid, rest[1])))
                if len(rest) == 2 and rest[0] == "snapshot" and method == "DELETE":
                    d = pve.snapdir(vmid, rest[1])
                    if not os.path.exists(d):
                        return self.reply(500, None, f"snapshot '{rest[1]}' does not exist")
                    return self.reply(200, pve.task(node, "qmdelsnapshot", vmid, lambda: shutil.rmtree(d)))
                if rest == ["status", "start"] and method == "POST":
                    return self.reply(200, pve.task(node, "qmstart", vmid, lambda: pve.start(vmid)))
                if rest == ["status", "current"]:
                    n = pve.node_by_vmid(vmid)
                    run = n.get("state") in ("running", "frozen")
                    return self.reply(200, {"vmid": int(vmid), "name": n["name"], "status": "running" if run else "stopped",
                                            "qmpstatus": "paused" if n.get("state") == "frozen" else "running" if run else "stopped",
                                            "cpus": int(n.get("config", {}).get("cores", 2)),
                                            "maxmem": int(n.get("config", {}).get("memory", 4096)) * 1024 * 1024})
                if rest == ["status", "stop"] and method == "POST":
                    return self.reply(200, pve.task(node, "qmstop", vmid, lambda: pve.stop(vmid)))
                if rest == ["config"] and method == "GET":
                    n = pve.node_by_vmid(vmid)
                    cfg = {"name": n["name"], "cores": 2, "memory": "4096", **n.get("config", {})}
                    if n.get("ip") and "ipconfig0" not in cfg:
                        cfg["ipconfig0"] = f"ip={n['ip']}/24,gw={load(pve.lab_dir)['subnet']}.1"
                    if n.get("role") and "tags" not in cfg:
                        cfg["tags"] = f"rke2;{n['role']}"
                    cfg["digest"] = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
                    return self.reply(200, cfg)
                if rest == ["config"] and method in ("POST", "PUT"):
                    bad = check_config(load(pve.lab_dir), q)
                    if bad:
                        return self.reply(400, None, bad)
                    if method == "PUT":  # synchronous
                        with pve.lock:
                            pve.configure(vmid, q)
                        return self.reply(200, None)
                    return self.reply(200, pve.task(node, "qmconfig", vmid, lambda: pve.configure(vmid, q)))
            return self.reply(501, None, f"Method '{method} {self.path}' not implemented")

        def template(self, method, node, rest, q):
            """The Packer template (vmid 9000 on pve1): readable, and the source of clones."""
            t = TEMPLATE
            if node != t["pve_node"]:
                return self.reply(500, None, f"Configuration file 'nodes/{node}/qemu-server/{t['vmid']}.conf' does not exist")
            if rest == ["config"] and method == "GET":
                return self.reply(200, {"name": t["name"], "template": 1, "cores": 2, "memory": "4096", "agent": "1",
                                        "scsi0": f"local-lvm:base-{t['vmid']}-disk-0,size=40G", "ostype": "l26"})
            if rest == ["status", "current"]:
                return self.reply(200, {"vmid": t["vmid"], "name": t["name"], "status": "stopped", "template": 1})
            if rest == ["clone"] and method == "POST":
                newid = str(q.get("newid", ""))
                if not newid.isdigit() or not 100 <= int(newid) <= 999999999:
                    return self.reply(400, None, "Parameter verification failed. newid: property is missing or invalid")
                name = q.get("name") or f"Copy-of-VM-{t['name']}"
                target = q.get("target") or node
                if target not in PVE_HOSTS:
                    return self.reply(400, None, f"Parameter verification failed. target: no such cluster node '{target}'")
                if pve.node_by_vmid(newid) or int(newid) == t["vmid"]:
                    return self.reply(500, None, f"unable to create VM {newid}: config file already exists")
                if any(m["name"] == name and m.get("state") != "lost" for m in load(pve.lab_dir)["nodes"]):
                    return self.reply(500, None, f"a VM named {name} exists already")
                return self.reply(200, pve.task(node, "qmclone", t["vmid"], lambda: pve.clone(name, newid, target)))
            if method in ("POST", "PUT", "DELETE"):
                return self.reply(500, None, f"VM {t['vmid']} is a template")
            return self.reply(501, None, f"Method '{method} {self.path}' not implemented")

        def do_GET(self):
            self.route("GET")

        def do_PUT(self):
            self.route("PUT")

        def do_POST(self):
            self.route("POST")

        def do_DELETE(self):
            self.route("DELETE")

    return H


def check_config(lab, q):
    """What PVE's parameter verification says of a config update, for the keys the lab reads."""
    for k in ("cores", "memory", "sockets"):
        if k in q and not str(q[k]).isdigit():
            return f"Parameter verification failed. {k}: type check ('integer') failed - got '{q[k]}'"
    if "ipconfig0" in q:
        fields = dict(f.split("=", 1) for f in str(q["ipconfig0"]).split(",") if "=" in f)
        ip = fields.get("ip", "")
        if "/" not in ip and ip != "dhcp":
            return f"Parameter verification failed. ipconfig0: invalid format - ip: '{ip}' is not a CIDR address"
        if not ip.startswith(lab["subnet"] + "."):
            return f"Parameter verification failed. ipconfig0: {ip} is outside the lab's network {lab['subnet']}.0/24"
    return None


class TLSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_pve(lab_dir):
    lab = load(lab_dir)
    srv = TLSServer((lab["pve_ip"], 8006), pve_handler(Pve(lab_dir), lab["pve_secret"]))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(lab_dir, "tls", "cert.pem"), os.path.join(lab_dir, "tls", "key.pem"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


# ---------------------------------------------------------------------------------- commands


def daemon(lab_dir, what):
    log = open(os.path.join(lab_dir, f"{what}.log"), "ab")
    p = subprocess.Popen([sys.executable, os.path.realpath(__file__), f"serve-{what}", "--dir", lab_dir],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return p.pid


def cmd_up(a):
    lab_dir = os.path.abspath(a.dir)
    if os.path.exists(os.path.join(lab_dir, "lab.json")):
        raise SystemExit(f"lab: {lab_dir} already holds a lab; `scripts/lab down --dir {lab_dir}` first")
    sub = a.subnet
    octets = sub.split(".")
    if len(octets) != 3 or octets[0] != "127" or not all(o.isdigit() and 0 <= int(o) <= 255 for o in octets):
        raise SystemExit(f"lab: --subnet must be three octets in 127.0.0.0/8 (like 127.0.77), not {sub}")
    for t in ("etcd", "etcdctl", "unshare", "nsenter", "openssl", "ssh-keygen"):
        if not shutil.which(t):
            raise SystemExit(f"lab: `{t}` is missing (scripts/test installs it: etcd-server, etcd-client, util-linux, openssl, openssh-client)")
    if not os.path.exists("/usr/sbin/sshd"):
        raise SystemExit("lab: /usr/sbin/sshd is missing (apt-get install openssh-server)")
    if os.geteuid() != 0:
        raise SystemExit("lab: needs root (namespaces and mounts)")
    os.makedirs(lab_dir, exist_ok=True)
    open(os.path.join(lab_dir, MARKER), "w").close()
    # Proxmox hosts: the servers spread one per host (pve1, pve2, pve3), the agents too.
    nodes = [{"name": f"rke2-server-{i + 1}", "ip": f"{sub}.{11 + i}", "role": "servers", "vmid": 201 + i,
              "pve_node": PVE_HOSTS[i % len(PVE_HOSTS)]} for i in range(a.servers)]
    nodes += [{"name": f"rke2-agent-{i + 1}", "ip": f"{sub}.{21 + i}", "role": "agents", "vmid": 211 + i,
               "pve_node": PVE_HOSTS[i % len(PVE_HOSTS)]} for i in range(a.agents)]
    for n in nodes:
        # As the Terraform module configures its clones (lab/terraform.py imports them at `up`).
        n["config"] = {"name": n["name"], "cores": 2, "memory": 8192, "onboot": 1, "agent": "1",
                       "ipconfig0": f"ip={n['ip']}/24,gw={sub}.1", "tags": f"rke2;{n['role']};rke2-template-9000",
                       "scsi0": f"local-lvm:vm-{n['vmid']}-disk-0,size={40 if n['role'] == 'servers' else 60}G"}
    for n in nodes:
        if port_open(n["ip"], a.port, 0.2):
            raise SystemExit(f"lab: {n['ip']}:{a.port} is already taken (another lab? pick another --subnet)")
    lab = {"dir": lab_dir, "subnet": sub, "lb_ip": f"{sub}.10", "pve_ip": f"{sub}.5", "ssh_port": a.port,
           "nodes": nodes, "pve_secret": os.urandom(12).hex(),
           "versions": a.versions.split(","),
           "timing": {"ready_delay": a.ready_delay, "hb_grace": a.hb_grace, "evict_seconds": a.evict_seconds,
                      "pve_task_seconds": a.pve_task_seconds}}
    save(lab_dir, lab)
    ssh = os.path.join(lab_dir, "ssh")
    os.makedirs(ssh, exist_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rke2-lab", "-f", os.path.join(ssh, "id_ed25519"))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rke2-lab-host", "-f", os.path.join(ssh, "host_ed25519"))
    shutil.copy(os.path.join(ssh, "id_ed25519.pub"), os.path.join(ssh, "authorized_keys"))
    hostpub = open(os.path.join(ssh, "host_ed25519.pub")).read().split()[:2]
    with open(os.path.join(ssh, "known_hosts"), "w") as f:
        for n in nodes:
            host = n["ip"] if a.port == 22 else f"[{n['ip']}]:{a.port}"
            f.write(f"{host} {hostpub[0]} {hostpub[1]}\n")
    tls = os.path.join(lab_dir, "tls")
    os.makedirs(tls, exist_ok=True)
    sans = ",".join([f"IP:{sub}.{i}" for i in [5, 10] + [int(n["ip"].rsplit(".", 1)[1]) for n in nodes]]
                    + ["IP:127.0.0.1", f"DNS:{API_NAME}", "DNS:localhost"])
    # A lab CA and one leaf for every lab address (rustls refuses a self-signed CA as a server cert).
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", os.path.join(tls, "ca-key.pem"), "-out", os.path.join(tls, "ca.pem"),
        "-days", "7", "-subj", "/CN=rke2-lab CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", *ec, "-keyout", os.path.join(tls, "key.pem"), "-out", os.path.join(tls, "leaf.csr"),
        "-subj", "/CN=rke2-lab")
    with open(os.path.join(tls, "leaf.ext"), "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n")
    run("openssl", "x509", "-req", "-in", os.path.join(tls, "leaf.csr"), "-CA", os.path.join(tls, "ca.pem"),
        "-CAkey", os.path.join(tls, "ca-key.pem"), "-CAcreateserial", "-days", "7",
        "-extfile", os.path.join(tls, "leaf.ext"), "-out", os.path.join(tls, "cert.pem"))
    for n in nodes:
        prepare_node(lab_dir, lab, n)
    for n in nodes:
        boot_node(lab_dir, lab, n, start_services=False)
        save(lab_dir, lab)
    lab["lb_pid"] = daemon(lab_dir, "lb")
    lab["pve_pid"] = daemon(lab_dir, "pve")
    # The canary's LoadBalancer address (the first of the MetalLB pool) answered as kube-proxy
    # would; it reads the operator's kubeconfig per request, so it may start before the deploy.
    lab_lb = subprocess.Popen([sys.executable, os.path.join(HERE, "kubectl.py"), "lab-lb", f"{sub}.200:80"],
                              env=dict(os.environ, KUBECONFIG=os.path.join(lab_dir, "operator", "kubeconfig")),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(lab_dir, "lab-lb.log"), "ab"), start_new_session=True)
    lab["lab_lb_pid"] = lab_lb.pid
    save(lab_dir, lab)
    for ip, port in ((lab["lb_ip"], 9345), (lab["pve_ip"], 8006)):
        end = time.time() + 10
        while not port_open(ip, port) and time.time() < end:
            time.sleep(0.1)
    bindir = os.path.join(lab_dir, "bin")
    os.makedirs(bindir, exist_ok=True)
    for t in ("kubectl", "helm"):
        os.symlink(os.path.join(HERE, "kubectl.py"), os.path.join(bindir, t))
    tf_dir = write_terraform(lab_dir, lab, a, nodes)
    with open(os.path.join(bindir, "terraform"), "w") as f:
        # The operator's machine trusts its Proxmox VE's CA; the lab's Terraform trusts the lab's.
        f.write(f"#!/bin/sh\n# The lab's Terraform stand-in (lab/terraform.py), written by `scripts/lab up`.\n"
                f"SSL_CERT_FILE=\"{tls}/ca.pem\" exec python3 \"{os.path.join(HERE, 'terraform.py')}\" \"$@\"\n")
    os.chmod(os.path.join(bindir, "terraform"), 0o755)
    inv = os.path.join(lab_dir, "inventory.toml")
    with open(inv, "w") as f:
        f.write(f"# The RKE2 lab ({sub}.0/24 on loopback), written by `scripts/lab up`.\n"
                f"[defaults]\nuser = \"root\"\nidentity_file = \"{ssh}/id_ed25519\"\nuse_agent = false\n"
                f"known_hosts = \"{ssh}/known_hosts\"\nhost_key_check = \"strict\"\nconnect_timeout = \"5s\"\n")
        for n in nodes:
            f.write(f"\n[hosts.{n['name']}]\naddress = \"{n['ip']}\"\n" + (f"port = {a.port}\n" if a.port != 22 else "")
                    + f"groups = [\"{n['role']}\"]\nvars = {{ vmid = {n['vmid']}, pve_node = \"{n['pve_node']}\" }}\n")
    env = os.path.join(lab_dir, "env.sh")
    with open(env, "w") as f:
        f.write(f"""# Source this to run the RKE2 runbooks against the lab in {lab_dir} (written by `scripts/lab up`).
export PATH="{bindir}:$PATH"
export RUNBOOK_INVENTORY="{inv}"
export RKE2_PROVISION=false
export RKE2_WORKDIR="{lab_dir}/operator"
export KUBECONFIG="{lab_dir}/operator/kubeconfig"
export RKE2_API_HOST="{lab['lb_ip']}"
export RKE2_API_IP="{lab['lb_ip']}"
export RKE2_VERSION="{lab['versions'][0]}"
export RKE2_METALLB_RANGE="{sub}.200-{sub}.220"
export RKE2_TOKEN="lab-token-{os.urandom(8).hex()}"
export S3_ACCESS_KEY="lab-s3-access"
export S3_SECRET_KEY="lab-s3-secret-{os.urandom(6).hex()}"
export LONGHORN_S3_ACCESS_KEY="lab-longhorn-access"
export LONGHORN_S3_SECRET_KEY="lab-longhorn-secret-{os.urandom(6).hex()}"
export PROXMOX_URL="https://{lab['pve_ip']}:8006/api2/json"
export PROXMOX_TOKEN_ID="{PVE_TOKEN_ID}"
export PROXMOX_TOKEN="{lab['pve_secret']}"
export PROXMOX_CA_FILE="{tls}/ca.pem"
export PROXMOX_VE_API_TOKEN="{PVE_TOKEN_ID}={lab['pve_secret']}"
export RKE2_TERRAFORM_DIR="{tf_dir}"
""")
    import_terraform(lab_dir, lab, tf_dir, bindir)
    # The lab's S3 (lab/s3.py): started here, its env lines appended to env.sh.
    s3.up(lab_dir, lab, env)
    save(lab_dir, lab)
    # The lab's vCenter (lab/vsphere.py): the same VMs through the vSphere REST API.
    vsphere.up(lab_dir, lab, env)
    save(lab_dir, lab)
    os.makedirs(os.path.join(lab_dir, "operator"), exist_ok=True)
    with open(os.path.join(lab_dir, "updates.json"), "w") as f:
        json.dump(UPDATES, f, indent=1)
    say(f"lab: {len(nodes)} nodes up in {lab_dir} (registration address {lab['lb_ip']}, Proxmox API {lab['pve_ip']}:8006)")
    print(inv)
    print(env)


def write_terraform(lab_dir, lab, a, nodes):
    """The Proxmox env and module copied into the lab (Terraform keeps its state beside the env,
    which must not be the repository's), with a terraform.tfvars of the lab's values: its
    Proxmox API, names, vmids, hosts and addresses as `up` made them. Returns the env's path."""
    src = os.path.join(HERE, "..", "runbooks", "infra", "terraform")
    dst = os.path.join(lab_dir, "terraform")
    skip = shutil.ignore_patterns(".terraform", "terraform.tfstate*", "tfplan", "*.tfvars", ".terraform.lock.hcl")
    for rel in (os.path.join("envs", "lab"), os.path.join("modules", "rke2", "proxmox")):
        shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel), ignore=skip)
    sub = lab["subnet"]
    servers = [n for n in nodes if n["role"] == "servers"]
    agents = [n for n in nodes if n["role"] == "agents"]
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    key = open(os.path.join(lab_dir, "ssh", "id_ed25519.pub")).read().strip()
    env = os.path.join(dst, "envs", "lab")
    with open(os.path.join(env, "terraform.tfvars"), "w") as f:
        f.write(f"""# The RKE2 lab's values, written by `scripts/lab up` (the lab's Proxmox VE API stand-in).
proxmox_endpoint = "https://{lab['pve_ip']}:8006/"
cluster_name     = "rke2"
template_vmid    = {TEMPLATE['vmid']}
template_host    = "{TEMPLATE['pve_node']}"
vm_id_base       = 201
hosts            = {q(PVE_HOSTS)}
server_count     = {len(servers)}
agent_count      = {len(agents)}
server_ips       = {q([f"{sub}.{11 + i}/24" for i in range(len(servers))])}
agent_ips        = {q([f"{sub}.{21 + i}/24" for i in range(len(agents))])}
gateway          = "{sub}.1"
dns_servers      = ["{sub}.1"]
domain           = "lab.internal"
api_host         = "{API_NAME}"
api_ip           = "{lab['lb_ip']}"
ssh_user         = "root"
ssh_public_keys  = [{json.dumps(key)}]
""")
    return env


def import_terraform(lab_dir, lab, tf_dir, bindir):
    """The lab's VMs stand for the deploy's Terraform run: imported into the lab's env, so its
    state knows them as the module's nodes (a later plan shows no changes)."""
    env = dict(os.environ, PROXMOX_VE_API_TOKEN=f"{PVE_TOKEN_ID}={lab['pve_secret']}")
    tf = os.path.join(bindir, "terraform")
    if subprocess.run(["python3", "-c", "import hcl2"], capture_output=True).returncode != 0:
        say("lab: python-hcl2 is missing for python3: the lab's terraform does not work (scripts/test installs it)")
        return
    r = subprocess.run([tf, f"-chdir={tf_dir}", "init", "-input=false"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lab: terraform init in {tf_dir}: {r.stderr.strip()}")
    # One apply of `import` blocks (Terraform 1.5+), then the blocks go: a VM lost later must be
    # planned for creation again, not imported.
    blocks = os.path.join(tf_dir, "lab-imports.tf")
    with open(blocks, "w") as f:
        for n in lab["nodes"]:
            f.write(f'import {{\n  to = module.rke2.proxmox_virtual_environment_vm.node["{n["name"]}"]\n'
                    f'  id = "{n["pve_node"]}/{n["vmid"]}"\n}}\n')
    r = subprocess.run([tf, f"-chdir={tf_dir}", "apply", "-input=false", "-auto-approve"], env=env,
                       capture_output=True, text=True)
    os.remove(blocks)
    if r.returncode != 0:
        raise SystemExit(f"lab: terraform apply (imports) in {tf_dir}: {r.stderr.strip()}")


def cmd_down(a):
    lab_dir = os.path.abspath(a.dir)
    if not os.path.exists(os.path.join(lab_dir, MARKER)):
        say(f"lab: no lab in {lab_dir}")
        return
    try:
        lab = load(lab_dir)
    except (OSError, ValueError):
        lab = {"nodes": []}
    for key in ("lb_pid", "pve_pid", "lab_lb_pid", "s3_pid", "vsphere_pid"):
        pid = lab.get(key)
        if pid and alive(pid):
            os.killpg(pid, signal.SIGKILL)
    for n in lab["nodes"]:
        if n.get("state") == "frozen":
            kill_node(n, signal.SIGCONT)
        kill_node(n)
    shutil.rmtree(lab_dir, ignore_errors=True)
    say(f"lab: removed {lab_dir}")


def cmd_status(a):
    lab_dir = os.path.abspath(a.dir)
    lab = load(lab_dir)
    for n in lab["nodes"]:
        d = node_dir(lab_dir, n["name"])
        units = []
        for u in ("rke2-server", "rke2-agent"):
            pidf = os.path.join(d, "varlib", "lab-node", u + ".pid")
            if os.path.exists(pidf):
                pid = int(open(pidf).read())
                units.append(f"{u}={'active' if alive(pid) else 'inactive'}")
        inst = os.path.join(d, "varlib", "lab-node", "installed.json")
        ver = json.load(open(inst))["version"] if os.path.exists(inst) else "-"
        ssh = "sshd up" if port_open(n["ip"], lab["ssh_port"]) else "sshd down"
        print(f"{n['name']:<16} {n.get('ip') or '-':<15} {n.get('role') or '-':<8} {n.get('state', '?'):<8} {ssh:<10} rke2 {ver:<16} {' '.join(units)}")
    print(f"registration address {lab['lb_ip']}:9345/6443 ({'up' if port_open(lab['lb_ip'], 9345) else 'down'}), "
          f"Proxmox API https://{lab['pve_ip']}:8006 ({'up' if port_open(lab['pve_ip'], 8006) else 'down'})")


def cmd_fault(a):
    lab_dir = os.path.abspath(a.dir)
    lab = load(lab_dir)
    ns = [n for n in lab["nodes"] if n["name"] == a.node]
    if not ns:
        raise SystemExit(f"lab: no node {a.node} (nodes: {', '.join(n['name'] for n in lab['nodes'])})")
    n = ns[0]
    d = node_dir(lab_dir, n["name"])
    if a.fault == "stop":          # the VM is powered off
        kill_node(n)
        n["state"] = "stopped"
    elif a.fault == "start":       # powered on: sshd and the enabled units come back
        n.pop("no_boot", None)     # whatever kept it from booting was fixed at the console
        if n.get("state") == "lost":
            raise SystemExit(f"lab: {n['name']} is lost for good")
        if n.get("state") == "frozen":
            kill_node(n, signal.SIGCONT)
            n["state"] = "running"
        elif n.get("state") != "running":
            boot_node(lab_dir, lab, n)
    elif a.fault == "no-boot":     # the next reboot does not come back (stays powered off)
        n["no_boot"] = True
    elif a.fault == "freeze":      # hung VM: every process stopped, sockets stay open
        kill_node(n, signal.SIGSTOP)
        n["state"] = "frozen"
    elif a.fault == "thaw":
        kill_node(n, signal.SIGCONT)
        n["state"] = "running"
    elif a.fault == "lose":        # the VM and its disks are gone
        kill_node(n)
        for sub in ("etc", "varlib"):
            shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
        n["state"] = "lost"
    elif a.fault == "stop-service":
        node_exec(n, ["systemctl", "stop", "rke2-server" if n["role"] == "servers" else "rke2-agent"])
    elif a.fault in ("fill-disk", "free-disk"):
        # Through the node's own view: writing an overlay's upper layer from outside while it is
        # mounted is not seen reliably.
        node_flag(n, "disk-full", a.fault == "fill-disk")
    elif a.fault == "break-sshd":
        try:
            os.kill(int(open(os.path.join(d, "sshd.pid")).read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    elif a.fault == "fix-sshd":
        node_exec(n, ["/usr/sbin/sshd", "-f", os.path.join(d, "sshd_config"), "-E", os.path.join(d, "sshd.log")])
    elif a.fault == "place":  # the VM is (live-)migrated to another Proxmox host
        if a.host not in PVE_HOSTS:
            raise SystemExit(f"lab: --host must be one of {', '.join(PVE_HOSTS)}")
        n["pve_node"] = a.host
    elif a.fault == "cert-expiry":  # every leaf certificate of the node expires in --days days
        r = node_exec(n, ["/usr/bin/python3", os.path.join(HERE, "node.py"), "lab-certs", "expire-in", str(a.days)],
                      check=False)
        if r.returncode != 0:
            raise SystemExit(f"lab: cert-expiry {n['name']}: {r.stderr.strip()}")
    elif a.fault in ("fail-install", "fix-install"):  # the next installs fail like a broken mirror
        node_flag(n, "fail-install", a.fault == "fail-install")
    else:
        raise SystemExit(f"lab: unknown fault {a.fault}")
    save(lab_dir, lab)
    say(f"lab: {a.fault} {n['name']}")


def cmd_reboot_node(a):
    """A node's `systemctl reboot`, run in the host's namespaces (the node's own processes all
    go): services stopped, then every process, then a boot like `start` unless `no-boot`."""
    lab_dir = os.path.abspath(a.dir)
    time.sleep(a.delay)
    lab = load(lab_dir)
    n = [m for m in lab["nodes"] if m["name"] == a.node][0]
    if n.get("state") != "running":
        return
    if not node_alive(n):
        return
    node_exec(n, ["systemctl", "stop", "rke2-server", "rke2-agent"], check=False)
    kill_node(n, signal.SIGTERM, check=False)  # the anchor goes too: no check for the KILL round
    time.sleep(0.5)
    kill_node(n, check=False)
    lab = load(lab_dir)
    n = [m for m in lab["nodes"] if m["name"] == a.node][0]
    n["state"] = "rebooting"
    save(lab_dir, lab)
    time.sleep(1)
    lab = load(lab_dir)
    n = [m for m in lab["nodes"] if m["name"] == a.node][0]
    if n.get("no_boot"):
        n["state"] = "stopped"
        save(lab_dir, lab)
        say(f"lab: {n['name']} did not come back from its reboot (fault no-boot)")
        return
    boot_node(lab_dir, lab, n)
    save(lab_dir, lab)
    say(f"lab: {n['name']} rebooted")


def cmd_add_node(a):
    """A spare VM cloned from the template (the same path as the Proxmox API's clone, config
    and start): booted, reachable over SSH, nothing of RKE2 on it, in the inventory under the
    group `spare` (the node-replace runbook's `replacement`)."""
    lab_dir = os.path.abspath(a.dir)
    lab = load(lab_dir)
    if any(n["name"] == a.node and n.get("state") != "lost" for n in lab["nodes"]):
        raise SystemExit(f"lab: a node {a.node} exists already")
    base, first_vmid = (11, 201) if a.role == "servers" else (21, 211)
    live = [n for n in lab["nodes"] if n.get("state") != "lost"]
    taken = {n["ip"] for n in live}
    octet = next(o for o in range(base, base + 9) if f"{lab['subnet']}.{o}" not in taken)
    vmids = {n["vmid"] for n in live}
    vmid = next(v for v in range(first_vmid, first_vmid + 9) if v not in vmids)
    try:
        n = vm_clone(lab_dir, lab, a.node, vmid, a.host)
        vm_configure(lab, n, {"ipconfig0": f"ip={lab['subnet']}.{octet}/24,gw={lab['subnet']}.1",
                              "tags": f"rke2;{a.role}"})
        vm_start(lab_dir, lab, n)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"lab: {e}")
    save(lab_dir, lab)
    with open(os.path.join(lab_dir, "inventory.toml"), "a") as f:
        f.write(f"\n[hosts.{n['name']}]\naddress = \"{n['ip']}\"\n"
                + (f"port = {lab['ssh_port']}\n" if lab["ssh_port"] != 22 else "")
                + f"groups = [\"spare\"]\nvars = {{ vmid = {n['vmid']}, pve_node = \"{n['pve_node']}\" }}\n")
    say(f"lab: {n['name']} up at {n['ip']} (vmid {vmid} on {a.host}), in the inventory as a spare")


def cmd_exec(a):
    lab = load(os.path.abspath(a.dir))
    n = [m for m in lab["nodes"] if m["name"] == a.node][0]
    r = node_exec(n, a.command, check=False)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.exit(r.returncode)


def main():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=os.environ.get("RKE2_LAB_DIR", "/tmp/rke2-lab"),
                        help="lab state directory (env RKE2_LAB_DIR; default /tmp/rke2-lab)")
    p = argparse.ArgumentParser(prog="scripts/lab", description="The RKE2 lab: Rocky-like nodes on loopback with a real etcd")
    sp = p.add_subparsers(dest="cmd", required=True)

    def sub(name, **kw):
        return sp.add_parser(name, parents=[common], **kw)

    up = sub("up", help="start the lab; prints the inventory and the env file last")
    up.add_argument("--subnet", default="127.0.77", help="first three octets of the lab's loopback addresses")
    up.add_argument("--servers", type=int, default=3)
    up.add_argument("--agents", type=int, default=2)
    up.add_argument("--port", type=int, default=22, help="sshd port on every node address")
    up.add_argument("--versions", default="v1.33.4+rke2r1,v1.33.5+rke2r1,v1.34.1+rke2r1,v1.35.0+rke2r1",
                    help="RKE2 versions the lab's install script offers (first = stable)")
    up.add_argument("--ready-delay", type=float, default=4, help="seconds from service start to node Ready")
    up.add_argument("--hb-grace", type=float, default=6, help="seconds without heartbeat before NotReady")
    up.add_argument("--evict-seconds", type=float, default=1, help="seconds per pod eviction in drain")
    up.add_argument("--pve-task-seconds", type=float, default=1, help="seconds a Proxmox task runs")
    sub("down", help="stop and remove everything of the lab")
    sub("status", help="nodes, services, versions")
    f = sub("fault", help="break a node")
    f.add_argument("node")
    f.add_argument("fault", choices=["stop", "start", "no-boot", "freeze", "thaw", "lose", "stop-service", "fill-disk",
                                     "free-disk", "break-sshd", "fix-sshd", "fail-install", "fix-install", "cert-expiry", "place"])
    f.add_argument("--host", default="pve1", help="place: the Proxmox host the VM runs on from now")
    f.add_argument("--days", type=int, default=20, help="cert-expiry: days until the certificates expire")
    an = sub("add-node", help="a spare VM (cloned from the template, no RKE2), in the inventory's group spare")
    an.add_argument("node")
    an.add_argument("--role", choices=["servers", "agents"], default="servers", help="address range and vmid range")
    an.add_argument("--host", default="pve1", help="the Proxmox host the VM runs on")
    e = sub("exec", help="run a command inside a node")
    e.add_argument("node")
    e.add_argument("command", nargs=argparse.REMAINDER)
    r = sub("reboot-node", help="(internal) the reboot a node asked for")
    r.add_argument("node")
    r.add_argument("--delay", type=float, default=0.5)
    sub("serve-lb")
    sub("serve-pve")
    a = p.parse_args()
    if a.cmd == "serve-lb":
        asyncio.run(lb_main(os.path.abspath(a.dir)))
    elif a.cmd == "serve-pve":
        serve_pve(os.path.abspath(a.dir))
    else:
        {"up": cmd_up, "down": cmd_down, "status": cmd_status, "fault": cmd_fault, "exec": cmd_exec,
         "reboot-node": cmd_reboot_node, "add-node": cmd_add_node}[a.cmd](a)


if __name__ == "__main__":
    main()
