#!/usr/bin/python3
"""The lab's rke2-server / rke2-agent service, started by the lab's `systemctl` inside a node.

A server runs a real etcd member on the node's address (client 2379, peer 2380, metrics 2381),
the supervisor on :9345 (`/ping` → `pong`; joins with the cluster token) and an API server on
:6443 that proxies to its local etcd member, so the API is down whenever that member has no
quorum. An agent registers through the registration address's supervisor. Both heartbeat
into etcd; readers count a node Ready once its service has run `ready_delay` seconds and its
heartbeat is fresh. The process writes `<state>/<unit>.ready` when `systemctl start` may return.
A server also plays RKE2's etcd-snapshot controller once at start: an `EtcdSnapshotFile` for
every snapshot in its snapshot directory and (with etcd-s3) in S3 that has none.
"""

import http.server
import json
import os
import secrets
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from labcommon import (  # noqa: E402
    NODE_STATE,
    Etcd,
    LabError,
    Store,
    ensure_certs,
    http_json,
    node_info,
    parse_version,
    rfc3339,
)

DATA = "/var/lib/rancher/rke2"
DB = DATA + "/server/db"
CONFIG = "/etc/rancher/rke2/config.yaml"
CRITICAL = ["cni", "disable-kube-proxy", "cluster-cidr", "service-cidr", "cluster-dns", "cluster-domain"]


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def read_config():
    import yaml

    cfg = {}
    paths = [CONFIG]
    d = CONFIG + ".d"
    if os.path.isdir(d):
        paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".yaml")]
    for p in paths:
        try:
            with open(p) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            continue
        except yaml.YAMLError as e:
            raise LabError(f"failed to parse {p}: {e}")
        if not isinstance(data, dict):
            raise LabError(f"failed to parse {p}: not a mapping")
        cfg.update(data)
    return cfg


def installed():
    try:
        with open(NODE_STATE + "/installed.json") as f:
            return json.load(f)
    except OSError:
        return None


def unit_active(unit):
    try:
        with open(NODE_STATE + "/units.json") as f:
            return json.load(f).get(unit, {}).get("active", False)
    except OSError:
        return False


def check_token(given, cluster_token):
    if not given:
        return False
    if given == cluster_token:
        return True
    # K10<ca hash>::server:<token> (the node-token file's form)
    return given.rsplit(":", 1)[-1] == cluster_token and "::" in given


def ping(server_url):
    try:
        status, body = http_json(server_url.rstrip("/") + "/ping", timeout=3)
    except OSError as e:
        return f"{e}"
    return None if status == 200 and str(body).strip() == "pong" else f"HTTP {status} {body}"


class Handler(http.server.BaseHTTPRequestHandler):
    """Supervisor (:9345) and API server (:6443) of a server node."""

    svc = None
    port = None

    def log_message(self, *args):
        pass

    def reply(self, status, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else (
            json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b"{}"
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def bearer(self):
        h = self.headers.get("Authorization") or ""
        return h[7:] if h.startswith("Bearer ") else ""

    def do_GET(self):
        s = self.svc
        if self.port == 9345 and self.path == "/ping":
            return self.reply(200, "pong", "text/plain")
        if self.port == 6443 and self.path.startswith("/readyz"):
            if self.bearer() != s.admin_token:
                return self.reply(401, {"message": "Unauthorized"})
            ok = s.etcd_ok()
            if self.path.startswith("/readyz/etcd"):
                return self.reply(200 if ok else 500, "ok" if ok else "[-]etcd failed: reason withheld", "text/plain")
            lines = ["[+]ping ok", "[+]log ok", "[+]etcd ok" if ok else "[-]etcd failed: reason withheld",
                     "[+]informer-sync ok", "[+]poststarthook/start-apiextensions-controllers ok"]
            lines.append("readyz check passed" if ok else "readyz check failed")
            return self.reply(200 if ok else 500, "\n".join(lines) + "\n", "text/plain")
        if self.port == 6443 and self.path == "/version":
            return self.reply(200, {"gitVersion": s.version})
        self.reply(404, {"message": "not found"})

    def do_POST(self):
        s = self.svc
        if self.port == 6443 and self.path.startswith("/lab/etcd/v3/"):
            if self.bearer() not in (s.admin_token, s.cluster_token):
                return self.reply(401, {"message": "Unauthorized"})
            try:
                status, out = http_json(f"http://{s.ip}:2379/v3/" + self.path[len("/lab/etcd/v3/"):],
                                        self.body(), timeout=3)
            except OSError as e:
                return self.reply(503, {"error": f"etcdserver: request timed out ({e})"})
            return self.reply(status, out)
        if self.port == 9345 and self.path.startswith("/v1-lab/"):
            req = self.body()
            try:
                cluster_token = s.etcd().get("/lab/cluster/token")
            except LabError as e:
                return self.reply(503, {"error": str(e)})
            if not check_token(req.get("token"), cluster_token):
                return self.reply(401, {"error": "token is not valid for this cluster"})
            try:
                return self.reply(200, s.supervise(self.path[len("/v1-lab/"):], req))
            except LabError as e:
                return self.reply(409, {"error": str(e)})
        self.reply(404, {"message": "not found"})


class ThreadingTLSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Service:
    def __init__(self, kind):
        self.kind = kind
        self.node = node_info()
        # RKE2 names the node after the hostname (node prep sets it).
        self.name, self.ip = os.uname().nodename, self.node["ip"]
        self.unit = f"rke2-{kind}"
        self.etcd_proc = None
        self.admin_token = None
        self.cluster_token = None
        self.started = time.time()
        self.stopping = False

    # ------------------------------------------------------------------- helpers
    def etcd(self):
        return Etcd(f"http://{self.ip}:2379", timeout=3)

    def etcd_ok(self):
        try:
            # A linearizable read needs a leader: no quorum, no answer.
            self.etcd().get("/lab/health")
            return True
        except LabError:
            return False

    def fail(self, msg):
        log("level=fatal msg=" + json.dumps(msg))
        if self.etcd_proc and self.etcd_proc.poll() is None:
            self.etcd_proc.kill()
            self.etcd_proc.wait()
        sys.exit(1)

    # ------------------------------------------------------------------- supervisor
    def supervise(self, op, req):
        et = self.etcd()
        store = Store(et)
        if op == "join":
            role = req["role"]
            want = parse_version(req["version"])
            cfg = json.loads(et.get("/lab/cluster/config") or "{}")
            servers = []
            for n in store.list("nodes"):
                labels = n["metadata"].get("labels", {})
                if labels.get("node-role.kubernetes.io/control-plane") == "true":
                    servers.append(parse_version(n["status"]["nodeInfo"]["kubeletVersion"]))
            if role == "server":
                for k in CRITICAL:
                    if k in cfg and str(req.get("config", {}).get(k, cfg[k])) != str(cfg[k]):
                        raise LabError(f"critical configuration value mismatch between servers: {k}")
                for v in servers:
                    if abs(v[1] - want[1]) > 1 or v[0] != want[0]:
                        raise LabError(f"version skew: joining server {req['version']} is more than one minor from a server at v{v[0]}.{v[1]}")
                peer = f"http://{req['ip']}:2380"
                st, members = http_json(f"http://{self.ip}:2379/v3/cluster/member/list", {}, timeout=3)
                for m in members.get("members", []):
                    if peer in m.get("peerURLs", []):
                        http_json(f"http://{self.ip}:2379/v3/cluster/member/remove", {"ID": m["ID"]}, timeout=3)
                st, added = http_json(f"http://{self.ip}:2379/v3/cluster/member/add", {"peerURLs": [peer]}, timeout=5)
                if st != 200:
                    raise LabError(f"etcd member add failed: {added}")
                parts = []
                for m in added.get("members", []):
                    name = m.get("name") or (req["name"] if peer in m.get("peerURLs", []) else None)
                    if name:
                        parts.append(f"{name}={m['peerURLs'][0]}")
                return {"initial_cluster": ",".join(parts)}
            if servers and want > min(servers):
                raise LabError(f"kubelet version {req['version']} is newer than the oldest kube-apiserver; upgrade the servers first")
            return {"ok": True}
        if op == "heartbeat":
            hb = {"t": time.time(), "started": req["started"], "version": req["version"],
                  "role": req["role"], "iscsid": req.get("iscsid", False)}
            et.put("/lab/hb/" + req["name"], json.dumps(hb))
            if req.get("register"):
                register_node(store, req["name"], req["ip"], req["version"], req["role"], req.get("boot_id", ""))
            return {"ok": True}
        raise LabError("unknown supervisor call " + op)

    # ------------------------------------------------------------------- etcd
    def start_etcd(self, initial_cluster, state):
        os.makedirs(DB, exist_ok=True)
        args = ["etcd", "--name", self.name, "--data-dir", DB + "/etcd",
                "--listen-client-urls", f"http://{self.ip}:2379",
                "--advertise-client-urls", f"http://{self.ip}:2379",
                "--listen-peer-urls", f"http://{self.ip}:2380",
                "--initial-advertise-peer-urls", f"http://{self.ip}:2380",
                "--listen-metrics-urls", f"http://{self.ip}:2381",
                "--heartbeat-interval", "100", "--election-timeout", "1000"]
        if initial_cluster:
            args += ["--initial-cluster", initial_cluster, "--initial-cluster-state", state,
                     "--initial-cluster-token", "rke2-lab"]
        logf = open(NODE_STATE + "/etcd.log", "ab")
        self.etcd_proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        log(f"etcd started: {' '.join(args[1:3])} state={state}")

    def wait_etcd(self, secs):
        end = time.time() + secs
        while time.time() < end:
            if self.etcd_proc.poll() is not None:
                self.fail(f"etcd exited with code {self.etcd_proc.returncode}; see {NODE_STATE}/etcd.log")
            if self.etcd_ok():
                return
            time.sleep(0.3)
        self.fail("etcd did not become healthy (no quorum?)")

    # ------------------------------------------------------------------- main
    def run(self):
        inst = installed()
        if not inst or inst["type"] != self.kind:
            self.fail(f"{self.unit} is not installed")
        self.version = inst["version"]
        try:
            cfg = read_config()
        except LabError as e:
            self.fail(str(e))
        token = cfg.get("token")
        server = cfg.get("server")
        if token is not None and not isinstance(token, str):
            token = str(token)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, lambda n, f: (log(f"stopping on signal {n}"), self.stop()))
        # A start issues missing certificates and renews those near expiry (RKE2 does it on start).
        try:
            ensure_certs(self.kind)
        except LabError as e:
            self.fail(f"certificates: {e}")
        if self.kind == "agent":
            return self.run_agent(cfg, token, server)
        fresh = not os.path.isdir(DB + "/etcd/member")
        if not fresh:
            log("etcd data exists: starting the existing member (server: is ignored)")
            self.start_etcd(None, "existing")
        elif server:
            err = ping(server)
            if err:
                self.fail(f"failed to contact the registration address {server}/ping: {err}")
            st, out = http_json(server.rstrip("/") + "/v1-lab/join",
                                {"token": token, "role": "server", "name": self.name, "ip": self.ip,
                                 "version": self.version,
                                 "config": {k: cfg[k] for k in CRITICAL if k in cfg}}, timeout=10)
            if st != 200:
                self.fail(f"join {server} refused: {out.get('error') if isinstance(out, dict) else out}")
            self.start_etcd(out["initial_cluster"], "existing")
        else:
            self.start_etcd(f"{self.name}=http://{self.ip}:2380", "new")
        self.wait_etcd(float(self.node.get("etcd_wait", 60)))
        try:
            os.remove(DB + "/reset-flag")
        except OSError:
            pass
        et = self.etcd()
        store = Store(et)
        cluster_token = et.get("/lab/cluster/token")
        if cluster_token is None:
            cluster_token = token or secrets.token_hex(16)
            et.put("/lab/cluster/token", cluster_token)
            et.put("/lab/cluster/admin-token", secrets.token_hex(16))
            et.put("/lab/cluster/config", json.dumps({k: cfg.get(k, default_critical(k)) for k in CRITICAL}))
            seed_cluster(store, cfg)
            et.put("/lab/cluster/timing", json.dumps({k: self.node[k] for k in ("ready_delay", "hb_grace", "evict_seconds")
                                                      if k in self.node}))
        elif token and not check_token(token, cluster_token):
            self.fail("token in config.yaml does not match the cluster's token (bootstrap data is encrypted with it)")
        self.cluster_token = cluster_token
        self.admin_token = et.get("/lab/cluster/admin-token")
        os.makedirs(DATA + "/server", exist_ok=True)
        with open(DATA + "/server/token", "w") as f:
            f.write(f"K10{secrets.token_hex(8)}::server:{cluster_token}\n")
        with open(DATA + "/server/node-token", "w") as f:
            f.write(f"K10{secrets.token_hex(8)}::server:{cluster_token}\n")
        os.makedirs("/etc/rancher/rke2", exist_ok=True)
        mode = int(str(cfg.get("write-kubeconfig-mode", "0600")), 8)
        kc = kubeconfig("https://127.0.0.1:6443", self.admin_token, DATA + "/server/tls/client-admin")
        with open("/etc/rancher/rke2/rke2.yaml", "w") as f:
            f.write(kc)
        os.chmod("/etc/rancher/rke2/rke2.yaml", mode)
        register_node(store, self.name, self.ip, self.version, "server", boot_id())
        write_kubelet_kubeconfig("https://127.0.0.1:6443", self.admin_token)
        self.heartbeat_local()
        for port in (9345, 6443):
            h = type(f"H{port}", (Handler,), {"svc": self, "port": port})
            srv = ThreadingTLSServer((self.ip, port), h)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.node["tls_cert"], self.node["tls_key"])
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        # RKE2's etcd-snapshot controller: an EtcdSnapshotFile for every snapshot that has none
        # (after a restore, those of the restored snapshot and of every later one are missing).
        threading.Thread(target=reconcile_snapshots, args=(store, self.name), daemon=True).start()
        self.mark_ready()
        log("rke2 is up and running")
        while not self.stopping:
            time.sleep(1)
            if self.etcd_proc.poll() is not None:
                self.fail("etcd exited")
            self.heartbeat_local()

    def heartbeat_local(self):
        try:
            self.etcd().put("/lab/hb/" + self.name, json.dumps(
                {"t": time.time(), "started": self.started, "version": self.version, "role": "server",
                 "iscsid": unit_active("iscsid")}))
        except LabError:
            pass

    def run_agent(self, cfg, token, server):
        if not server:
            self.fail("agent needs server: in config.yaml")
        err = ping(server)
        if err:
            self.fail(f"failed to contact the registration address {server}/ping: {err}")
        st, out = http_json(server.rstrip("/") + "/v1-lab/join",
                            {"token": token, "role": "agent", "name": self.name, "ip": self.ip,
                             "version": self.version}, timeout=10)
        if st != 200:
            self.fail(f"join {server} refused: {out.get('error') if isinstance(out, dict) else out}")
        first = True
        write_kubelet_kubeconfig(server.rstrip("/").rsplit(":", 1)[0] + ":6443", token)
        self.mark_ready()
        log("rke2 agent is up and running")
        while not self.stopping:
            try:
                st, _ = http_json(server.rstrip("/") + "/v1-lab/heartbeat",
                          {"token": token, "name": self.name, "ip": self.ip, "version": self.version,
                           "role": "agent", "started": self.started, "register": first, "boot_id": boot_id(),
                           "iscsid": unit_active("iscsid")}, timeout=3)
                first = first and st != 200
            except OSError:
                pass
            time.sleep(1)

    def mark_ready(self):
        with open(f"{NODE_STATE}/{self.unit}.ready", "w") as f:
            f.write(str(os.getpid()))

    def stop(self):
        self.stopping = True
        if self.etcd_proc and self.etcd_proc.poll() is None:
            self.etcd_proc.terminate()
            try:
                self.etcd_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.etcd_proc.kill()
        os._exit(0)


def reconcile_snapshots(store, node):
    from node import SNAPDIR, s3_list, s3_location, s3_settings, snapshot_object  # noqa: E402

    try:
        have = {o["metadata"]["name"] for o in store.list("etcdsnapshotfiles")}
        objs = []
        if os.path.isdir(SNAPDIR):
            for f in sorted(os.listdir(SNAPDIR)):
                p = os.path.join(SNAPDIR, f)
                if os.path.isfile(p) and not f.endswith(".part"):
                    objs.append(snapshot_object(f, node, f"file://{p}", os.path.getsize(p), rfc3339(os.path.getmtime(p))))
        s3 = s3_settings([])
        if s3:
            for name, size, modified in s3_list(s3):
                objs.append(snapshot_object(name, node, s3_location(s3, name), size, modified, s3))
        added = [o for o in objs if o["metadata"]["name"] not in have]
        for o in added:
            store.put("etcdsnapshotfiles", o)
        if added:
            log(f"etcd-snapshot controller: {len(added)} EtcdSnapshotFile object(s) reconciled")
    except LabError as e:
        log(f"level=error msg=\"etcd-snapshot controller: {e}\"")


def default_critical(k):
    return {"cni": "canal", "disable-kube-proxy": False, "cluster-cidr": "10.42.0.0/16",
            "service-cidr": "10.43.0.0/16", "cluster-dns": "10.43.0.10", "cluster-domain": "cluster.local"}[k]


def kubeconfig(server, token, client=None):
    """A kubeconfig as RKE2 writes it; with `client`, the client certificate and key embedded (the
    lab's API authenticates the token; the certificate is there for its expiry date)."""
    cert = ""
    if client:
        import base64

        with open(client + ".crt", "rb") as f:
            crt = base64.b64encode(f.read()).decode()
        with open(client + ".key", "rb") as f:
            key = base64.b64encode(f.read()).decode()
        cert = f"\n    client-certificate-data: {crt}\n    client-key-data: {key}"
    return f"""apiVersion: v1
kind: Config
clusters:
- cluster:
    insecure-skip-tls-verify: true
    server: {server}
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
users:
- name: default
  user:
    token: {token}{cert}
"""


def boot_id():
    try:
        with open(f"{NODE_STATE}/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def write_kubelet_kubeconfig(server, token):
    """The kubelet's own credentials (RKE2: agent/kubelet.kubeconfig on every node); the lab's
    kubectl takes it on the node with `--kubeconfig`. The lab's API knows no node identities, so
    it carries the token the node joined with."""
    os.makedirs(DATA + "/agent", exist_ok=True)
    path = DATA + "/agent/kubelet.kubeconfig"
    with open(path, "w") as f:
        f.write(kubeconfig(server, token))
    os.chmod(path, 0o600)


def register_node(store, name, ip, version, role, boot=""):
    n = store.get("nodes", None, name) or {"metadata": {"name": name, "labels": {}}, "spec": {}}
    labels = n["metadata"].setdefault("labels", {})
    labels["kubernetes.io/hostname"] = name
    if role == "server":
        labels["node-role.kubernetes.io/control-plane"] = "true"
        labels["node-role.kubernetes.io/etcd"] = "true"
    n["status"] = {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"kubeletVersion": version, "osImage": "Rocky Linux 9.6 (Blue Onyx)", "bootID": boot,
                     "kernelVersion": "5.14.0-570.el9_6.x86_64",
                     "containerRuntimeVersion": "containerd://2.0.5-k3s1"},
    }
    store.put("nodes", n)


def seed_cluster(store, cfg):
    """What RKE2's bundled charts leave on a fresh cluster (kube-system), per the chosen CNI."""
    cni = cfg.get("cni", "canal")
    if isinstance(cni, list):
        cni = cni[0]
    for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
        store.put("namespaces", {"metadata": {"name": ns}})
    ds = "cilium" if cni == "cilium" else "rke2-canal"
    store.put("daemonsets", {"metadata": {"name": ds, "namespace": "kube-system", "labels": {"app": ds}},
                             "spec": {"template": {"metadata": {"labels": {"k8s-app": ds}}}}})
    store.put("deployments", {"metadata": {"name": "rke2-coredns-rke2-coredns", "namespace": "kube-system"},
                              "spec": {"replicas": 2, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                                       "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}}}},
                              })
    for i in range(2):
        # Scheduled by the first reader that sees a Ready node (the lab's scheduler runs on read).
        store.put("pods", {"metadata": {"name": f"rke2-coredns-rke2-coredns-{i}", "namespace": "kube-system",
                                        "labels": {"k8s-app": "kube-dns"},
                                        "ownerReferences": [{"kind": "ReplicaSet", "name": "rke2-coredns-rke2-coredns"}]},
                           "spec": {"nodeName": None}})
    for chart in (f"rke2-{cni}", "rke2-coredns", "rke2-metrics-server", "rke2-snapshot-controller"):
        store.put("jobs", {"metadata": {"name": f"helm-install-{chart}", "namespace": "kube-system"},
                           "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        store.put("addons", {"metadata": {"name": chart, "namespace": "kube-system"},
                             "spec": {"source": f"/var/lib/rancher/rke2/server/manifests/{chart}.yaml"}})
    kpr = False
    try:
        with open(DATA + "/server/manifests/rke2-cilium-config.yaml") as f:
            import yaml

            doc = yaml.safe_load(f) or {}
            vals = yaml.safe_load(doc.get("spec", {}).get("valuesContent") or "") or {}
            kpr = bool(vals.get("kubeProxyReplacement"))
    except (OSError, ValueError):
        pass
    routing = not cfg.get("disable-kube-proxy") or (cni == "cilium" and kpr)
    store.etcd.put("/lab/cluster/service-routing", "true" if routing else "false")


# rke2-server.service and rke2-agent.service have Restart=always and RestartSec=5s: a server whose
# join failed (etcd refused the member add while the last joiner was still settling) is started
# again by systemd and joins then. The failed start is marked so that `systemctl start` reports it
# at once, as systemd's start job does, while the restart waits.
RESTART_SEC = 5


if __name__ == "__main__":
    kind = sys.argv[1]
    os.makedirs(NODE_STATE, exist_ok=True)
    failed_marker = os.path.join(NODE_STATE, f"rke2-{kind}.failed")
    code = 0
    try:
        Service(kind).run()
    except LabError as e:
        log("level=fatal msg=" + json.dumps(str(e)))
        code = 1
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    if code:
        with open(failed_marker, "w") as f:
            f.write(str(code))
        log(f"{kind}: main process exited, status={code}; scheduled restart in {RESTART_SEC}s (Restart=always)")
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(RESTART_SEC)
        try:
            os.remove(failed_marker)
        except OSError:
            pass
        os.execv(sys.executable, [sys.executable] + sys.argv)
