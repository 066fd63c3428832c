"""Shared pieces of the RKE2 lab: the lab's settings, the etcd v3 JSON gateway client, the
Kubernetes-shaped object store kept in etcd, a kubectl-compatible JSONPath subset, and YAML.

Everything here is Python 3 standard library plus PyYAML (Debian `python3-yaml`), so the
stand-ins run with the machine's /usr/bin/python3 inside the nodes' namespaces.
"""

import base64
import json
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import yaml

NODE_FILE = "/etc/lab-node.json"
NODE_STATE = "/var/lib/lab-node"


class LabError(Exception):
    """A failure a stand-in reports on stderr with a non-zero exit, like the real tool would."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def node_info():
    """The node this process runs on (inside a lab node's namespaces), else None (the runner)."""
    try:
        with open(NODE_FILE) as f:
            return json.load(f)
    except OSError:
        return None


def lab_settings(lab_dir):
    with open(os.path.join(lab_dir, "lab.json")) as f:
        return json.load(f)


def b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


def unb64(s):
    return base64.b64decode(s or "").decode()


def prefix_end(prefix):
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def insecure_tls():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http_json(url, body=None, headers=None, timeout=5.0, method=None):
    """POST (or GET without a body) JSON; returns (status, parsed body or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    ctx = insecure_tls() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        status = e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


class Etcd:
    """etcd v3 through its JSON gateway, either directly (`http://ip:2379`) or through a lab
    API server (`https://ip:6443/lab/etcd`, bearer token) that proxies to its local member."""

    def __init__(self, base, token=None, timeout=4.0):
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, path, body):
        headers = {"Authorization": "Bearer " + self.token} if self.token else {}
        try:
            status, out = http_json(self.base + "/v3/" + path, body, headers, self.timeout)
        except OSError as e:
            raise LabError(f"The connection to the server {self.base} was refused or timed out: {e}")
        if status == 401:
            raise LabError("error: You must be logged in to the server (Unauthorized)")
        if status != 200:
            msg = out.get("error") or out.get("message") if isinstance(out, dict) else out
            raise LabError(f"Error from server (ServiceUnavailable): etcd: {msg}")
        return out

    def get(self, key):
        out = self.call("kv/range", {"key": b64(key)})
        kvs = out.get("kvs") or []
        return unb64(kvs[0]["value"]) if kvs else None

    def range(self, prefix):
        out = self.call("kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return [(unb64(kv["key"]), unb64(kv.get("value"))) for kv in out.get("kvs") or []]

    def put(self, key, value):
        self.call("kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key):
        self.call("kv/deleterange", {"key": b64(key)})

    def delete_prefix(self, prefix):
        self.call("kv/deleterange", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})


# ------------------------------------------------------------------------------- resources

# resource name → (kind, apiVersion, namespaced)
RESOURCES = {
    "nodes": ("Node", "v1", False),
    "namespaces": ("Namespace", "v1", False),
    "pods": ("Pod", "v1", True),
    "services": ("Service", "v1", True),
    "secrets": ("Secret", "v1", True),
    "configmaps": ("ConfigMap", "v1", True),
    "persistentvolumeclaims": ("PersistentVolumeClaim", "v1", True),
    "persistentvolumes": ("PersistentVolume", "v1", False),
    "deployments": ("Deployment", "apps/v1", True),
    "statefulsets": ("StatefulSet", "apps/v1", True),
    "daemonsets": ("DaemonSet", "apps/v1", True),
    "jobs": ("Job", "batch/v1", True),
    "storageclasses": ("StorageClass", "storage.k8s.io/v1", False),
    "addons": ("Addon", "k3s.cattle.io/v1", True),
    "etcdsnapshotfiles": ("ETCDSnapshotFile", "k3s.cattle.io/v1", False),
    "helmchartconfigs.helm.cattle.io": ("HelmChartConfig", "helm.cattle.io/v1", True),
    "volumes.longhorn.io": ("Volume", "longhorn.io/v1beta2", True),
    "backups.longhorn.io": ("Backup", "longhorn.io/v1beta2", True),
    "backuptargets.longhorn.io": ("BackupTarget", "longhorn.io/v1beta2", True),
    "recurringjobs.longhorn.io": ("RecurringJob", "longhorn.io/v1beta2", True),
    "ipaddresspools.metallb.io": ("IPAddressPool", "metallb.io/v1beta1", True),
    "l2advertisements.metallb.io": ("L2Advertisement", "metallb.io/v1beta1", True),
}
ALIASES = {
    "node": "nodes", "no": "nodes", "namespace": "namespaces", "ns": "namespaces",
    "pod": "pods", "po": "pods", "service": "services", "svc": "services",
    "secret": "secrets", "configmap": "configmaps", "cm": "configmaps",
    "persistentvolumeclaim": "persistentvolumeclaims", "pvc": "persistentvolumeclaims",
    "persistentvolume": "persistentvolumes", "pv": "persistentvolumes",
    "deployment": "deployments", "deploy": "deployments", "statefulset": "statefulsets",
    "sts": "statefulsets", "daemonset": "daemonsets", "ds": "daemonsets", "job": "jobs",
    "storageclass": "storageclasses", "sc": "storageclasses", "addon": "addons",
    "etcdsnapshotfile": "etcdsnapshotfiles", "helmchartconfig": "helmchartconfigs.helm.cattle.io",
    "volume.longhorn.io": "volumes.longhorn.io", "volumes": "volumes.longhorn.io",
    "backup.longhorn.io": "backups.longhorn.io", "backups": "backups.longhorn.io",
    "backuptarget.longhorn.io": "backuptargets.longhorn.io",
    "backuptargets": "backuptargets.longhorn.io", "recurringjob.longhorn.io": "recurringjobs.longhorn.io",
    "recurringjobs": "recurringjobs.longhorn.io",
    "ipaddresspool.metallb.io": "ipaddresspools.metallb.io", "ipaddresspools": "ipaddresspools.metallb.io",
    "l2advertisement.metallb.io": "l2advertisements.metallb.io",
    "l2advertisements": "l2advertisements.metallb.io",
}
KIND_TO_RESOURCE = {v[0]: k for k, v in RESOURCES.items()}


def resource_name(word):
    w = word.lower()
    w = ALIASES.get(w, w)
    if w not in RESOURCES:
        raise LabError(f'error: the server doesn\'t have a resource type "{word}"')
    return w


def namespaced(resource):
    return RESOURCES[resource][2]


def obj_key(resource, ns, name):
    return f"/registry/{resource}/{ns if namespaced(resource) else '_'}/{name}"


class Store:
    """Kubernetes-shaped objects as JSON values under /registry/<resource>/<ns>/<name>."""

    def __init__(self, etcd):
        self.etcd = etcd

    def get(self, resource, ns, name):
        raw = self.etcd.get(obj_key(resource, ns, name))
        return json.loads(raw) if raw else None

    def list(self, resource, ns=None):
        prefix = f"/registry/{resource}/"
        if ns and namespaced(resource):
            prefix += ns + "/"
        return [json.loads(v) for _, v in self.etcd.range(prefix)]

    def put(self, resource, obj):
        kind, api, nsd = RESOURCES[resource]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api)
        md = obj.setdefault("metadata", {})
        if nsd:
            md.setdefault("namespace", "default")
        else:
            md.pop("namespace", None)
        md.setdefault("creationTimestamp", rfc3339(time.time()))
        md.setdefault("uid", b64(os.urandom(9)).replace("/", "x").replace("+", "y").lower())
        self.etcd.put(obj_key(resource, md.get("namespace"), md["name"]), json.dumps(obj))
        return obj

    def delete(self, resource, ns, name):
        self.etcd.delete(obj_key(resource, ns, name))


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_rfc3339(s):
    import calendar

    return calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%SZ"))


# -------------------------------------------------------------------------------- versions


def parse_version(v):
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)(?:[+-]rke2r(\d+))?", v or "")
    if not m:
        raise LabError(f"invalid RKE2 version {v!r}")
    return tuple(int(x or 0) for x in m.groups())


# -------------------------------------------------------------------------------- jsonpath


def _tokens(path):
    """`.a.b[0]['x'][*]..c` → list of ('key', k) / ('idx', i) / ('all',) / ('filter', expr) / ('desc', k)."""
    out = []
    i = 0
    while i < len(path):
        c = path[i]
        if path.startswith("..", i):
            j = i + 2
            m = re.match(r"((?:\\.|[^.\[])+)", path[j:])
            out.append(("desc", m.group(1).replace("\\.", ".")))
            i = j + len(m.group(1))
        elif c == ".":
            m = re.match(r"((?:\\.|[^.\[])+)", path[i + 1 :])
            if m:
                out.append(("key", m.group(1).replace("\\.", ".")))
                i += 1 + len(m.group(1))
            else:
                i += 1
        elif c == "[":
            j = path.index("]", i) if not path.startswith("[?(", i) else path.index(")]", i) + 1
            inner = path[i + 1 : j]
            if inner == "*":
                out.append(("all",))
            elif inner.startswith("?("):
                out.append(("filter", inner[2:-1]))
            elif inner.startswith("'") or inner.startswith('"'):
                out.append(("key", inner[1:-1]))
            else:
                out.append(("idx", int(inner)))
            i = j + 1
        else:
            m = re.match(r"((?:\\.|[^.\[])+)", path[i:])
            out.append(("key", m.group(1).replace("\\.", ".")))
            i += len(m.group(1))
    return out


def _filter_ok(item, expr):
    m = re.match(r"^@((?:\.[\w\\.-]+|\[[^\]]+\])*)\s*(==|!=)\s*['\"]?(.*?)['\"]?$", expr.strip())
    if not m:
        return False
    vals = jsonpath_values(item, m.group(1))
    got = vals[0] if vals else None
    if isinstance(got, bool):
        got = "true" if got else "false"
    same = str(got) == m.group(3) if got is not None else False
    return same if m.group(2) == "==" else not same


def jsonpath_values(obj, path):
    cur = [obj]
    for tok in _tokens(path):
        nxt = []
        for v in cur:
            if tok[0] == "key":
                if isinstance(v, dict) and tok[1] in v:
                    nxt.append(v[tok[1]])
            elif tok[0] == "idx":
                if isinstance(v, list) and -len(v) <= tok[1] < len(v):
                    nxt.append(v[tok[1]])
            elif tok[0] == "all":
                if isinstance(v, list):
                    nxt.extend(v)
                elif isinstance(v, dict):
                    nxt.extend(v.values())
            elif tok[0] == "filter":
                if isinstance(v, list):
                    nxt.extend(x for x in v if _filter_ok(x, tok[1]))
            elif tok[0] == "desc":
                stack = [v]
                while stack:
                    x = stack.pop(0)
                    if isinstance(x, dict):
                        if tok[1] in x:
                            nxt.append(x[tok[1]])
                        stack.extend(x.values())
                    elif isinstance(x, list):
                        stack.extend(x)
        cur = nxt
    return cur


def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else str(v)


def jsonpath_template(obj, template):
    """kubectl's `-o jsonpath=` templates: text, `{.path}`, `{range …}…{end}`, `{"\\n"}`."""
    parts = re.findall(r"\{((?:[^{}\"]|\"[^\"]*\")*)\}|([^{]+)", template)
    out = []

    def render(seq, ctx):
        i = 0
        while i < len(seq):
            expr, text = seq[i]
            if text:
                out.append(text)
            elif expr.startswith("range "):
                depth, j = 1, i + 1
                while j < len(seq):
                    if seq[j][0].startswith("range "):
                        depth += 1
                    elif seq[j][0] == "end":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                for item in jsonpath_values(ctx, expr[6:].strip()):
                    render(seq[i + 1 : j], item)
                i = j
            elif expr.startswith('"'):
                out.append(json.loads(expr))
            elif expr != "end":
                vals = jsonpath_values(ctx, expr.strip())
                out.append(" ".join(_fmt(v) for v in vals))
            i += 1

    render(parts, obj)
    return "".join(out)


def load_yaml_docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def dump_yaml(obj):
    return yaml.safe_dump(obj, sort_keys=False)


# ------------------------------------------------------------------------------- certificates
# RKE2's leaf certificates as the lab issues them with the real openssl: 365 days, renewed by a
# start when within RKE2_RENEW_DAYS of expiry (servers) or on every start (agent certificates),
# deleted by `rke2 certificate rotate` and issued again by the next start. The CAs last 10 years.

RKE2_DATA = "/var/lib/rancher/rke2"
RKE2_RENEW_DAYS = 120
SERVER_CERTS = {  # path under the data dir: subject CN
    "server/tls/client-admin.crt": "system:admin",
    "server/tls/client-kube-apiserver.crt": "system:kube-apiserver",
    "server/tls/serving-kube-apiserver.crt": "kube-apiserver",
    "server/tls/client-supervisor.crt": "system:rke2-supervisor",
    "server/tls/etcd/server-client.crt": "etcd-server",
}
AGENT_CERTS = {
    "agent/client-kubelet.crt": "system:node",
    "agent/serving-kubelet.crt": "kubelet",
    "agent/client-kube-proxy.crt": "system:kube-proxy",
}


def _openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"openssl {args[0]}: {r.stderr.strip()}")
    return r.stdout


def cert_ca(kind):
    """The node's CA (server/tls/client-ca.* on servers; a lab CA under agent/ on agents)."""
    base = f"{RKE2_DATA}/server/tls/client-ca" if kind == "server" else f"{RKE2_DATA}/agent/lab-ca"
    crt, key = base + ".crt", base + ".key"
    if not os.path.exists(crt):
        os.makedirs(os.path.dirname(crt), exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", crt, "-days", "3650", "-subj", f"/CN=rke2-client-ca@{int(time.time())}")
    return crt, key


def cert_not_after(path):
    out = _openssl("x509", "-noout", "-enddate", "-in", path).strip()
    return parse_openssl_date(out.split("=", 1)[1])


def parse_openssl_date(s):
    import calendar

    return calendar.timegm(time.strptime(s.replace("  ", " "), "%b %d %H:%M:%S %Y GMT"))


def issue_cert(kind, rel, cn, days):
    crt = f"{RKE2_DATA}/{rel}"
    key = crt[:-4] + ".key"
    ca, cakey = cert_ca(kind)
    os.makedirs(os.path.dirname(crt), exist_ok=True)
    if not os.path.exists(key):
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", key)
    csr = crt + ".csr"
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", cakey, "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
             "-days", str(days), "-out", crt)
    os.remove(csr)


def node_certs(kind):
    certs = dict(AGENT_CERTS)
    if kind == "server":
        certs.update(SERVER_CERTS)
    return certs


def ensure_certs(kind):
    """What a start of rke2-<kind> does to the certificates: issue the missing ones, renew the
    server's within RKE2_RENEW_DAYS of expiry and the agent's always."""
    now = time.time()
    for rel, cn in node_certs(kind).items():
        path = f"{RKE2_DATA}/{rel}"
        if not os.path.exists(path):
            issue_cert(kind, rel, cn, 365)
        elif rel.startswith("agent/") or cert_not_after(path) - now < RKE2_RENEW_DAYS * 86400:
            issue_cert(kind, rel, cn, 365)


def age_certs(kind, days):
    """Lab fault: every leaf certificate of the node expires in `days` days."""
    for rel, cn in node_certs(kind).items():
        issue_cert(kind, rel, cn, days)
