#!/usr/bin/env python3
"""The lab's vCenter: the vSphere Automation REST API (`/api`, vCenter 7.0 U2 and later) over the
same VMs as the lab's Proxmox API, for hypervisor-maintenance's vSphere path.

One source of truth: a VM's host and power state are the lab's (`lab.json`: `pve_node`, `state`),
so the Proxmox view and this one always agree. ESXi host `esxN` (id `host-100N`) is Proxmox host
`pveN`; VM `vm-<vmid>` is the Proxmox VM `<vmid>`. Served on `<subnet>.5:443` with the lab's
leaf certificate (lab CA), as `https://<subnet>.5/api`.

What it enforces, as vCenter does:
- `POST /api/session` with HTTP basic authentication (the env file's `VSPHERE_USER` /
  `VSPHERE_PASSWORD`) answers 201 with a session token; every other request needs it in
  `vmware-api-session-id` (401 `UNAUTHENTICATED` without it, or after `DELETE /api/session`).
- `GET /api/vcenter/host` and `GET /api/vcenter/vm` with the `names`, `hosts`, `power_states`
  filters (repeated query parameters); `GET /api/vcenter/vm/{vm}/power`.
- `POST /api/vcenter/vm/{vm}?action=relocate` with `{"placement": {"host": …}}`: vMotion. Refused
  (400) for a host that does not exist or is in maintenance mode; the VM keeps running (its node's
  processes and sockets stay as they are, as the lab's Proxmox online migrate). Synchronous, 204.
- `POST /api/vcenter/vm/{vm}/guest/power?action=shutdown`: a clean guest shutdown (RKE2 stopped,
  then the node's processes), returns 204 at once, as vCenter does, and the VM is POWERED_OFF a
  moment later. `POST /api/vcenter/vm/{vm}/power?action=start` boots the node (refused on a host
  in maintenance mode).

Host maintenance mode is not in the REST API (it is `EnterMaintenanceMode_Task` of the SOAP API,
`govc host.maintenance.enter`): the lab's stand-in is this file's CLI,
`python3 lab/vsphere.py maintenance --dir LAB enter|exit esx1`, which refuses to enter while a
powered-on VM is on the host (without DRS vCenter waits for them to be moved), and records every
change in `vsphere.json` (`history`).

`up(lab_dir, lab, env_file)` is what lab.py calls; `serve` is the daemon; `down` in lab.py kills
it by its `vsphere_pid`. Live sessions are counted in `vsphere-sessions.json`, with every token
issued (tests check that a run logs out and that its bundle holds no token).
"""

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

PORT = 443
USER = "runbook@vsphere.local"
ESX = ["esx1", "esx2", "esx3"]  # esxN is the lab's Proxmox host pveN


def host_id(name):
    return f"host-{1000 + ESX.index(name) + 1}"


def conf_path(lab_dir):
    return os.path.join(lab_dir, "vsphere.json")


def read_conf(lab_dir):
    with open(conf_path(lab_dir)) as f:
        return json.load(f)


def write_conf(lab_dir, conf):
    tmp = conf_path(lab_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=1)
    os.replace(tmp, conf_path(lab_dir))


def esx_of(lab_mod, n):
    return ESX[lab_mod.PVE_HOSTS.index(n.get("pve_node", lab_mod.PVE_HOSTS[0]))]


def power(n):
    return "POWERED_ON" if n.get("state") in ("running", "frozen") else "POWERED_OFF"


def handler(lab_mod, lab_dir, pve):
    sessions = {}
    issued = []
    lock = threading.Lock()

    def record_sessions():
        # For the tests: how many are open, and every token issued (a bundle must hold none).
        with open(os.path.join(lab_dir, "vsphere-sessions.json.tmp"), "w") as f:
            json.dump({"open": len(sessions), "issued": issued}, f)
        os.replace(os.path.join(lab_dir, "vsphere-sessions.json.tmp"), os.path.join(lab_dir, "vsphere-sessions.json"))

    record_sessions()

    def vms():
        return [n for n in lab_mod.load(lab_dir)["nodes"] if n.get("state") != "lost"]

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, status, data=None):
            body = b"" if status == 204 else json.dumps(data).encode()
            self.send_response(status)
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, status, kind, msg):
            # The vAPI error shape of /api: error_type and localizable messages.
            self.reply(status, {"error_type": kind, "messages": [
                {"args": [], "default_message": msg, "id": f"com.vmware.lab.{kind.lower()}"}]})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n).decode() if n else ""
            try:
                return json.loads(raw) if raw.strip() else {}
            except ValueError:
                return None

        def route(self, method):
            u = urllib.parse.urlparse(self.path)
            p = u.path.rstrip("/").split("/")[1:]
            q = urllib.parse.parse_qs(u.query)
            action = (q.get("action") or [""])[0]
            if p[:1] != ["api"]:
                return self.error(404, "NOT_FOUND", "not found")
            p = p[1:]
            if p == ["session"] and method == "POST":
                auth = self.headers.get("Authorization") or ""
                conf = read_conf(lab_dir)
                want = "Basic " + base64.b64encode(f"{conf['user']}:{conf['password']}".encode()).decode()
                if auth != want:
                    return self.error(401, "UNAUTHENTICATED", "Authentication required.")
                token = uuid.uuid4().hex
                with lock:
                    issued.append(token)
                    sessions[token] = {"user": conf["user"], "created_time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
                    record_sessions()
                return self.reply(201, token)
            token = self.headers.get("vmware-api-session-id") or ""
            if token not in sessions:
                return self.error(401, "UNAUTHENTICATED", "Authentication required.")
            if p == ["session"]:
                if method == "DELETE":
                    with lock:
                        sessions.pop(token, None)
                        record_sessions()
                    return self.reply(204)
                if method == "GET":
                    return self.reply(200, sessions[token])
            if p == ["vcenter", "host"] and method == "GET":
                out = [{"host": host_id(h), "name": h, "connection_state": "CONNECTED", "power_state": "POWERED_ON"}
                       for h in ESX]
                if q.get("names"):
                    out = [h for h in out if h["name"] in q["names"]]
                if q.get("hosts"):
                    out = [h for h in out if h["host"] in q["hosts"]]
                return self.reply(200, out)
            if p == ["vcenter", "vm"] and method == "GET":
                out = [(n, {"vm": f"vm-{n['vmid']}", "name": n["name"], "power_state": power(n),
                            "cpu_count": int(n.get("config", {}).get("cores", 2)),
                            "memory_size_MiB": int(n.get("config", {}).get("memory", 8192))}) for n in vms()]
                if q.get("hosts"):
                    out = [(n, s) for n, s in out if host_id(esx_of(lab_mod, n)) in q["hosts"]]
                if q.get("names"):
                    out = [(n, s) for n, s in out if s["name"] in q["names"]]
                if q.get("power_states"):
                    out = [(n, s) for n, s in out if s["power_state"] in q["power_states"]]
                return self.reply(200, [s for _, s in out])
            if len(p) >= 3 and p[:2] == ["vcenter", "vm"]:
                found = [n for n in vms() if f"vm-{n['vmid']}" == p[2]]
                if not found:
                    return self.error(404, "NOT_FOUND", f"Virtual machine with identifier '{p[2]}' does not exist.")
                return self.vm(method, found[0], p[3:], action)
            return self.error(404, "NOT_FOUND", "not found")

        def vm(self, method, n, rest, action):
            vmid = n["vmid"]
            if rest == [] and method == "POST" and action == "relocate":
                spec = self.body()
                target = ((spec or {}).get("placement") or {}).get("host")
                names = {host_id(h): h for h in ESX}
                if not target or target not in names:
                    return self.error(400, "INVALID_ARGUMENT", f"Invalid placement: host '{target}' does not exist.")
                if names[target] in read_conf(lab_dir)["maintenance"]:
                    return self.error(400, "NOT_ALLOWED_IN_CURRENT_STATE",
                                      f"The operation is not allowed in the current state of the host ({names[target]} is in maintenance mode).")
                time.sleep(float(lab_mod.load(lab_dir)["timing"].get("pve_task_seconds", 1)))
                with pve.lock:
                    lab = lab_mod.load(lab_dir)
                    m = [x for x in lab["nodes"] if x["vmid"] == vmid][0]
                    # vMotion moves the running VM: its processes and sockets stay as they are.
                    m["pve_node"] = lab_mod.PVE_HOSTS[ESX.index(names[target])]
                    lab_mod.save(lab_dir, lab)
                return self.reply(204)
            if rest == ["power"] and method == "GET":
                return self.reply(200, {"state": power(n)} | ({"clean_power_off": True} if power(n) == "POWERED_OFF" else {}))
            if rest == ["power"] and method == "POST" and action == "start":
                if power(n) == "POWERED_ON":
                    return self.error(400, "ALREADY_IN_DESIRED_STATE", "Virtual machine is already powered on.")
                if esx_of(lab_mod, n) in read_conf(lab_dir)["maintenance"]:
                    return self.error(400, "NOT_ALLOWED_IN_CURRENT_STATE",
                                      f"The operation is not allowed in the current state of the host ({esx_of(lab_mod, n)} is in maintenance mode).")
                try:
                    with pve.lock:
                        pve.start(vmid)
                except Exception as e:  # the boot failed: vCenter's task error
                    return self.error(500, "ERROR", str(e))
                return self.reply(204)
            if rest == ["guest", "power"] and method == "POST" and action == "shutdown":
                if power(n) != "POWERED_ON" or not lab_mod.node_alive(n):
                    return self.error(400, "NOT_ALLOWED_IN_CURRENT_STATE", "Virtual machine is not powered on.")

                def down():
                    time.sleep(float(lab_mod.load(lab_dir)["timing"].get("pve_task_seconds", 1)))
                    with pve.lock:
                        pve.shutdown(vmid)

                # Returns at once; the guest shuts down on its own (poll the power state).
                threading.Thread(target=down, daemon=True).start()
                return self.reply(204)
            return self.error(404, "NOT_FOUND", "not found")

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def do_DELETE(self):
            self.route("DELETE")

    return H


def serve(lab_dir):
    import ssl

    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import lab as lab_mod

    lab = lab_mod.load(lab_dir)
    srv = lab_mod.TLSServer((lab["pve_ip"], PORT), handler(lab_mod, lab_dir, lab_mod.Pve(lab_dir)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(lab_dir, "tls", "cert.pem"), os.path.join(lab_dir, "tls", "key.pem"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


def maintenance(lab_dir, what, host):
    """`govc host.maintenance.enter/exit` of the lab: enter refuses while a powered-on VM runs
    on the host (without DRS, vCenter's task waits for them to be moved or shut down)."""
    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import lab as lab_mod

    if host not in ESX:
        raise SystemExit(f"vsphere: no ESXi host {host} (hosts: {', '.join(ESX)})")
    conf = read_conf(lab_dir)
    if what == "enter":
        on = [n["name"] for n in lab_mod.load(lab_dir)["nodes"]
              if n.get("state") != "lost" and esx_of(lab_mod, n) == host and power(n) == "POWERED_ON"]
        if on:
            raise SystemExit(f"vsphere: {host} still runs powered-on VMs ({', '.join(on)}): "
                             "move them away or shut them down before entering maintenance mode")
        if host not in conf["maintenance"]:
            conf["maintenance"].append(host)
    else:
        conf["maintenance"] = [h for h in conf["maintenance"] if h != host]
    conf["history"].append([what, host])
    write_conf(lab_dir, conf)
    print(f"vsphere: {host} {'entered' if what == 'enter' else 'exited'} maintenance mode", file=sys.stderr)


def up(lab_dir, lab, env_file):
    """Start the lab's vCenter and append its settings to the env file; returns the daemon's pid."""
    ip = lab["pve_ip"]
    password = "lab-vc-" + os.urandom(9).hex()
    write_conf(lab_dir, {"user": USER, "password": password, "maintenance": [], "history": []})
    log = open(os.path.join(lab_dir, "vsphere.log"), "ab")
    p = subprocess.Popen([sys.executable, os.path.realpath(__file__), "serve", "--dir", lab_dir],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    import socket

    end = time.time() + 10
    while time.time() < end:
        if p.poll() is not None:
            raise SystemExit(f"lab: the vCenter stand-in exited (see {lab_dir}/vsphere.log)")
        try:
            socket.create_connection((ip, PORT), 0.3).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"lab: the vCenter stand-in did not listen on {ip}:{PORT} (see {lab_dir}/vsphere.log)")
    lab["vsphere_pid"] = p.pid
    with open(env_file, "a") as f:
        f.write(f"# The lab's vCenter (lab/vsphere.py): the same VMs as the Proxmox API, ESXi hosts esx1-esx3 = pve1-pve3\n"
                f"export VSPHERE_URL=\"https://{ip}\"\n"
                f"export VSPHERE_USER=\"{USER}\"\n"
                f"export VSPHERE_PASSWORD=\"{password}\"\n"
                f"export VSPHERE_CA_FILE=\"{os.path.join(lab_dir, 'tls', 'ca.pem')}\"\n")
    return p.pid


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) == 3 and a[0] == "serve" and a[1] == "--dir":
        serve(a[2])
    elif len(a) == 5 and a[0] == "maintenance" and a[1] == "--dir" and a[3] in ("enter", "exit"):
        maintenance(os.path.abspath(a[2]), a[3], a[4])
    else:
        raise SystemExit("usage: vsphere.py serve --dir LAB | vsphere.py maintenance --dir LAB enter|exit esxN")
