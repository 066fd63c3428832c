#!/usr/bin/python3
"""The lab's `kubectl` and `helm`: the subset of their command lines the RKE2 runbooks use,
answered from the cluster state in the lab's etcd, reached through a server's API (:6443, via
the registration address for the runner). What controllers would do (node readiness from
heartbeats, DaemonSet pods on every node, Deployment pods scheduled on schedulable nodes,
LoadBalancer IPs from a MetalLB pool, Longhorn volumes for PVCs) is computed here, on read or
write, from the stored objects. Real behaviours the runbooks must respect are kept: `drain`
refuses DaemonSet pods without `--ignore-daemonsets` (and cordons first), `wait` fails at once
with "no matching resources found", the API is down without etcd quorum.
"""

import copy
import json
import os
import re
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
from labcommon import (  # noqa: E402
    RESOURCES,
    KIND_TO_RESOURCE,
    Etcd,
    LabError,
    Store,
    dump_yaml,
    http_json,
    jsonpath_template,
    jsonpath_values,
    load_yaml_docs,
    namespaced,
    node_info,
    parse_rfc3339,
    resource_name,
    rfc3339,
)

CLIENT_VERSION = "v1.33.4"

# A Longhorn volume's contents: the lines the canary app (image lab/canary) wrote to it. Kept in
# etcd beside the objects, so an etcd restore rolls them back with the volume objects.
VOLUME_DATA = "/lab/volume-data/"
# The Longhorn backup target (S3 in a real cluster): what each Backup copied, by backup name.
# In the lab it is an etcd prefix too, so backups taken after an etcd snapshot are rolled back
# with it (a real backup target keeps them); the drill restores backups older than its snapshot.
BACKUP_STORE = "/lab/backupstore/"
BACKUP_URL = "s3://longhorn-backups@lab/?backup={backup}&volume={volume}"
CANARY_IMAGE = "lab/canary"


def parse_duration(s, default=30.0):
    if not s:
        return default
    total, n = 0.0, ""
    for c in str(s):
        if c.isdigit() or c == ".":
            n += c
        elif c in "hms":
            total += float(n or 0) * {"h": 3600, "m": 60, "s": 1}[c]
            n = ""
    return total + float(n or 0)


class Args:
    """kubectl-style flags: `--x=y`, `--x y`, `-n ns`, booleans."""

    BOOL = {"-A", "--all-namespaces", "--all", "--no-headers", "--ignore-daemonsets", "--delete-emptydir-data",
            "--ignore-not-found", "--force", "--create-namespace", "--wait", "--client", "--short",
            "--force-update", "--install", "--disable-eviction", "--atomic", "--overwrite", "--watch=false", "-w"}

    def __init__(self, argv):
        self.pos, self.flags, self.sets = [], {}, []
        self.rest = []
        i = 0
        while i < len(argv):
            a = argv[i]
            if a == "--":
                self.rest = argv[i + 1:]
                break
            if a.startswith("-") and len(a) > 1:
                if "=" in a and a.startswith("--"):
                    k, v = a.split("=", 1)
                elif a in self.BOOL:
                    k, v = a, "true"
                elif a.startswith("-") and not a.startswith("--") and len(a) > 2:
                    k, v = a[:2], a[2:]
                else:
                    k = a
                    v = argv[i + 1] if i + 1 < len(argv) else ""
                    i += 1
                if k == "--set":
                    self.sets.append(v)
                self.flags[k] = v
            else:
                self.pos.append(a)
            i += 1

    def get(self, *names, default=None):
        for n in names:
            if n in self.flags:
                return self.flags[n]
        return default

    def has(self, *names):
        return any(self.get(n) not in (None, "false") for n in names)


# --------------------------------------------------------------------------------- client


def kubeconfig_path(a):
    return a.get("--kubeconfig") or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def connect(a):
    import yaml

    path = kubeconfig_path(a)
    try:
        with open(path) as f:
            kc = yaml.safe_load(f)
    except OSError:
        raise LabError("error: error loading config file \"%s\": open %s: no such file or directory\n"
                       "The connection to the server localhost:8080 was refused - did you specify the right host or port?" % (path, path))
    server = kc["clusters"][0]["cluster"]["server"]
    token = kc["users"][0]["user"].get("token", "")
    info = node_info()
    u = urllib.parse.urlparse(server)
    host = u.hostname
    if info and host in ("127.0.0.1", "localhost"):
        host = info["ip"]
    aliases = os.environ.get("LAB_HOSTS", "")
    for pair in filter(None, aliases.split(",")):
        name, ip = pair.split("=")
        if host == name:
            host = ip
    return f"https://{host}:{u.port or 6443}", token


class Cluster:
    def __init__(self, a):
        self.base, self.token = connect(a)
        self.etcd = Etcd(self.base + "/lab/etcd", self.token, timeout=6)
        self.store = Store(self.etcd)
        self._timing = None

    def raw(self, path):
        try:
            st, body = http_json(self.base + path, headers={"Authorization": "Bearer " + self.token}, timeout=6)
        except OSError as e:
            raise LabError(f"The connection to the server {self.base[8:]} was refused - did you specify the right host or port? ({e})")
        if st == 401:
            raise LabError("error: You must be logged in to the server (Unauthorized)")
        text = body if isinstance(body, str) else json.dumps(body)
        if st != 200:
            raise LabError(f"Error from server (InternalError): an error on the server (\"{text.strip()}\") has prevented the request from succeeding")
        return text

    def timing(self):
        if self._timing is None:
            self._timing = json.loads(self.etcd.get("/lab/cluster/timing") or "{}")
        return self._timing

    # ------------------------------------------------------------------ views
    def heartbeats(self):
        return {k.rsplit("/", 1)[1]: json.loads(v) for k, v in self.etcd.range("/lab/hb/")}

    def nodes(self):
        now = time.time()
        t = self.timing()
        hbs = self.heartbeats()
        out = []
        for n in self.store.list("nodes"):
            hb = hbs.get(n["metadata"]["name"])
            ready = bool(hb) and now - hb["t"] < t.get("hb_grace", 8) and now - hb["started"] >= t.get("ready_delay", 5)
            status = "True" if ready else ("False" if hb and now - hb["t"] < t.get("hb_grace", 8) else "Unknown")
            n["status"]["conditions"] = [{"type": "Ready", "status": status,
                                          "reason": "KubeletReady" if ready else "NodeStatusUnknown"}]
            n["lab"] = {"iscsid": bool(hb and hb.get("iscsid"))}
            out.append(n)
        return out

    def ready_nodes(self):
        return [n for n in self.nodes() if n["status"]["conditions"][0]["status"] == "True"]

    def pods(self, ns=None):
        nodes = {n["metadata"]["name"]: n for n in self.nodes()}
        ready = {k for k, n in nodes.items() if n["status"]["conditions"][0]["status"] == "True"}
        pods = self.store.list("pods", ns)
        for p in pods:
            if not p["spec"].get("nodeName") and ready:
                node = self.schedule()
                if node:
                    p["spec"]["nodeName"] = node
                    self.store.put("pods", p)
        for ds in self.store.list("daemonsets", ns):
            for name in nodes:
                labels = dict(ds["spec"].get("template", {}).get("metadata", {}).get("labels", {}))
                labels.update(ds["metadata"].get("labels", {}))
                pods.append({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": f"{ds['metadata']['name']}-{name}", "namespace": ds["metadata"]["namespace"],
                                          "labels": labels, "creationTimestamp": ds["metadata"]["creationTimestamp"],
                                          "ownerReferences": [{"kind": "DaemonSet", "name": ds["metadata"]["name"]}]},
                             "spec": {"nodeName": name}})
        routing = self.etcd.get("/lab/cluster/service-routing") != "false"
        for p in pods:
            node = p["spec"].get("nodeName")
            ok = node in ready
            if p["metadata"].get("labels", {}).get("k8s-app") == "kube-dns" and not routing:
                ok = False
            p["status"] = {"phase": "Running" if ok else ("Pending" if not node else "Unknown"),
                           "conditions": [{"type": "Ready", "status": "True" if ok else "False"}]}
        return pods

    def get_objects(self, res, ns, all_ns):
        n = None if all_ns else ns
        if res == "nodes":
            return self.nodes()
        if res == "pods":
            return self.pods(n)
        objs = self.store.list(res, n)
        if res in ("daemonsets", "deployments", "statefulsets"):
            pods = self.pods(n)
            for o in objs:
                owned = [p for p in pods if p["metadata"].get("ownerReferences", [{}])[0].get("name") == o["metadata"]["name"]
                         and p["metadata"]["namespace"] == o["metadata"]["namespace"]]
                if res == "daemonsets" and o["metadata"]["name"] == "longhorn-manager":
                    nodes = {x["metadata"]["name"]: x for x in self.nodes()}
                    for p in owned:
                        if not nodes[p["spec"]["nodeName"]]["lab"]["iscsid"]:
                            p["status"]["conditions"][0]["status"] = "False"
                rd = sum(1 for p in owned if p["status"]["conditions"][0]["status"] == "True")
                if res == "daemonsets":
                    o["status"] = {"desiredNumberScheduled": len(owned), "numberReady": rd,
                                   "updatedNumberScheduled": len(owned), "numberAvailable": rd}
                else:
                    want = o["spec"].get("replicas", 1)
                    o["status"] = {"replicas": len(owned), "readyReplicas": rd, "availableReplicas": rd,
                                   "updatedReplicas": len(owned),
                                   "conditions": [{"type": "Available", "status": "True" if rd >= want else "False"}]}
        if res == "services":
            pool = self.lb_pool()
            for i, s in enumerate(sorted(objs, key=lambda o: o["metadata"]["creationTimestamp"] + o["metadata"]["name"])):
                if s.get("spec", {}).get("type") == "LoadBalancer":
                    s["status"] = {"loadBalancer": {"ingress": [{"ip": pool[i % len(pool)]}]} if pool else {}}
        if res == "backuptargets.longhorn.io":
            for o in objs:
                spec = o.get("spec", {})
                url = spec.get("backupTargetURL", "")
                cred = spec.get("credentialSecret", "")
                ok = bool(url) and (url.startswith("nfs://") or bool(cred and self.store.get("secrets", o["metadata"]["namespace"], cred)))
                o["status"] = {"available": ok}
        return objs

    def lb_pool(self):
        if not self.store.list("deployments", "metallb-system"):
            return []
        out = []
        for p in self.store.list("ipaddresspools.metallb.io"):
            for rng in p.get("spec", {}).get("addresses", []):
                if "-" in rng:
                    a, b = rng.split("-")
                    pa, pb = a.rsplit(".", 1), b.rsplit(".", 1)
                    out += [f"{pa[0]}.{i}" for i in range(int(pa[1]), int(pb[1]) + 1)]
                else:
                    out.append(rng.split("/")[0])
        return out

    # ------------------------------------------------------------------ controllers
    def schedule(self, exclude=()):
        cands = [n for n in self.ready_nodes() if not n.get("spec", {}).get("unschedulable")
                 and n["metadata"]["name"] not in exclude]
        if not cands:
            return None
        counts = {}
        for p in self.store.list("pods"):
            counts[p["spec"].get("nodeName")] = counts.get(p["spec"].get("nodeName"), 0) + 1
        agents = [n for n in cands if "node-role.kubernetes.io/control-plane" not in n["metadata"].get("labels", {})]
        pool = agents or cands
        return min(pool, key=lambda n: (counts.get(n["metadata"]["name"], 0), n["metadata"]["name"]))["metadata"]["name"]

    def reconcile(self, res, obj):
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        want = int(obj.get("spec", {}).get("replicas", 1))
        owned = [p for p in self.store.list("pods", ns)
                 if p["metadata"].get("ownerReferences", [{}])[0].get("name") == name]
        tmpl = obj.get("spec", {}).get("template", {})
        for p in owned[want:]:
            self.store.delete("pods", ns, p["metadata"]["name"])
        for i in range(len(owned), want):
            pname = f"{name}-{i}" if res == "statefulsets" else f"{name}-{os.urandom(3).hex()}"
            self.store.put("pods", {"metadata": {"name": pname, "namespace": ns,
                                                 "labels": tmpl.get("metadata", {}).get("labels", {}),
                                                 "ownerReferences": [{"kind": RESOURCES[res][0], "name": name}]},
                                    "spec": {"nodeName": self.schedule(), "volumes": tmpl.get("spec", {}).get("volumes", [])}})
        if res == "statefulsets":
            for vct in obj.get("spec", {}).get("volumeClaimTemplates", []):
                for i in range(want):
                    pvc = copy.deepcopy(vct)
                    pvc["metadata"] = {"name": f"{vct['metadata']['name']}-{name}-{i}", "namespace": ns}
                    if not self.store.get("persistentvolumeclaims", ns, pvc["metadata"]["name"]):
                        self.bind_pvc(pvc)

    def bind_pvc(self, pvc):
        want = pvc.get("spec", {}).get("volumeName")
        if want:
            # A static PV named by the claim (a restored Longhorn volume): bound when it exists.
            pv = self.store.get("persistentvolumes", None, want)
            pvc["status"] = {"phase": "Pending"}
            if pv:
                pv["spec"]["claimRef"] = {"name": pvc["metadata"]["name"], "namespace": pvc["metadata"]["namespace"]}
                self.store.put("persistentvolumes", pv)
                pvc["status"] = {"phase": "Bound"}
            self.store.put("persistentvolumeclaims", pvc)
            return
        sc = pvc.get("spec", {}).get("storageClassName")
        if not sc:
            for s in self.store.list("storageclasses"):
                if s["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true":
                    sc = s["metadata"]["name"]
        pvc["status"] = {"phase": "Pending"}
        if sc and self.store.get("storageclasses", None, sc):
            vol = "pvc-" + os.urandom(8).hex()
            size = pvc.get("spec", {}).get("resources", {}).get("requests", {}).get("storage", "1Gi")
            self.store.put("volumes.longhorn.io", {"metadata": {"name": vol, "namespace": "longhorn-system"},
                                                   "spec": {"size": size, "numberOfReplicas": 3},
                                                   "status": {"state": "attached", "robustness": "healthy",
                                                              "restoreRequired": False,
                                                              "kubernetesStatus": {"pvcName": pvc["metadata"]["name"],
                                                                                   "namespace": pvc["metadata"]["namespace"]}}})
            self.etcd.put(VOLUME_DATA + vol, "[]")
            self.store.put("persistentvolumes", {"metadata": {"name": vol}, "spec": {"storageClassName": sc,
                                                 "persistentVolumeReclaimPolicy": "Delete",
                                                 "claimRef": {"name": pvc["metadata"]["name"], "namespace": pvc["metadata"]["namespace"]},
                                                 "csi": {"driver": "driver.longhorn.io", "volumeHandle": vol}}})
            pvc.setdefault("spec", {})["volumeName"] = vol
            pvc["status"] = {"phase": "Bound"}
        self.store.put("persistentvolumeclaims", pvc)


# --------------------------------------------------------------------------------- output


def age(o):
    try:
        s = int(time.time() - parse_rfc3339(o["metadata"]["creationTimestamp"]))
    except (KeyError, ValueError):
        return "<unknown>"
    return f"{s}s" if s < 120 else f"{s // 60}m"


def table(res, objs, a, all_ns):
    wide = a.get("-o", "--output") == "wide"
    rows = []
    if res == "nodes":
        hdr = ["NAME", "STATUS", "ROLES", "AGE", "VERSION"] + (["INTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"] if wide else [])
        for n in objs:
            st = "Ready" if n["status"]["conditions"][0]["status"] == "True" else "NotReady"
            if n.get("spec", {}).get("unschedulable"):
                st += ",SchedulingDisabled"
            labels = n["metadata"].get("labels", {})
            roles = ",".join(sorted(k.split("/")[1] for k in labels if k.startswith("node-role.kubernetes.io/"))) or "<none>"
            ni = n["status"]["nodeInfo"]
            row = [n["metadata"]["name"], st, roles, age(n), ni["kubeletVersion"]]
            if wide:
                row += [n["status"]["addresses"][0]["address"], ni["osImage"], ni["kernelVersion"], ni["containerRuntimeVersion"]]
            rows.append(row)
    elif res == "pods":
        hdr = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"] + (["IP", "NODE"] if wide else [])
        for p in objs:
            ok = p["status"]["conditions"][0]["status"] == "True"
            row = [p["metadata"]["name"], "1/1" if ok else "0/1", p["status"]["phase"], "0", age(p)]
            if wide:
                row += ["10.42.0.1", p["spec"].get("nodeName") or "<none>"]
            rows.append(row)
    elif res in ("deployments", "statefulsets"):
        hdr = ["NAME", "READY", "AGE"]
        rows = [[o["metadata"]["name"], f"{o['status']['readyReplicas']}/{o['spec'].get('replicas', 1)}", age(o)] for o in objs]
    elif res == "volumes.longhorn.io":
        hdr = ["NAME", "STATE", "ROBUSTNESS", "SIZE", "AGE"]
        rows = [[o["metadata"]["name"], o.get("status", {}).get("state", ""), o.get("status", {}).get("robustness", ""),
                 str(o.get("spec", {}).get("size", "")), age(o)] for o in objs]
    elif res == "services":
        hdr = ["NAME", "TYPE", "EXTERNAL-IP", "AGE"]
        rows = [[o["metadata"]["name"], o.get("spec", {}).get("type", "ClusterIP"),
                 (o.get("status", {}).get("loadBalancer", {}).get("ingress") or [{"ip": "<none>"}])[0]["ip"], age(o)] for o in objs]
    elif res == "backuptargets.longhorn.io":
        hdr = ["NAME", "URL", "AVAILABLE", "AGE"]
        rows = [[o["metadata"]["name"], o.get("spec", {}).get("backupTargetURL", ""), str(o["status"]["available"]).lower(), age(o)] for o in objs]
    elif res == "etcdsnapshotfiles":
        hdr = ["NAME", "SNAPSHOTNAME", "NODE", "LOCATION", "SIZE", "CREATIONTIME"]
        rows = [[o["metadata"]["name"], o["spec"]["snapshotName"], o["spec"]["nodeName"], o["spec"]["location"],
                 o["status"]["size"], o["status"]["creationTime"]] for o in objs]
    else:
        hdr = ["NAME", "AGE"]
        rows = [[o["metadata"]["name"], age(o)] for o in objs]
    if all_ns and namespaced(res):
        hdr = ["NAMESPACE"] + hdr
        rows = [[o["metadata"].get("namespace", "")] + r for r, o in zip(rows, objs)]
    if a.has("--no-headers"):
        all_rows = rows
    else:
        all_rows = [hdr] + rows
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
    return "".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in all_rows)


def render(res_objs, a, all_ns, single):
    """res_objs: list of (resource, [objects])."""
    o = a.get("-o", "--output", default="")
    objs = [x for _, lst in res_objs for x in lst]
    for x in objs:
        x.pop("lab", None)
    if o == "json":
        return json.dumps(objs[0] if single else {"apiVersion": "v1", "kind": "List", "items": objs}, indent=4) + "\n"
    if o == "yaml":
        return dump_yaml(objs[0] if single else {"apiVersion": "v1", "kind": "List", "items": objs})
    if o == "name":
        return "".join(f"{RESOURCES[r][0].lower()}/{x['metadata']['name']}\n" for r, lst in res_objs for x in lst)
    if o.startswith("jsonpath="):
        tmpl = o[len("jsonpath="):]
        return jsonpath_template(objs[0] if single else {"items": objs}, tmpl)
    if o.startswith("custom-columns="):
        cols = [c.split(":", 1) for c in o[len("custom-columns="):].split(",")]
        rows = [] if a.has("--no-headers") else [[c[0] for c in cols]]
        for x in objs:
            rows.append([" ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in jsonpath_values(x, c[1])) or "<none>" for c in cols])
        if not rows:
            return ""
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)
    out = []
    for r, lst in res_objs:
        out.append(table(r, lst, a, all_ns))
    return "".join(out)


# --------------------------------------------------------------------------------- verbs


def targets(a, words):
    """`res/name …`, `res name …`, `res1,res2` → list of (resource, name or None)."""
    out = []
    if not words:
        raise LabError("error: You must specify the type of resource to get.")
    if "/" in words[0]:
        for w in words:
            r, n = w.split("/", 1)
            out.append((resource_name(r), n))
        return out
    res = [resource_name(r) for r in words[0].split(",")] if words[0] != "all" else \
        ["pods", "services", "daemonsets", "deployments", "statefulsets"]
    if words[0].startswith("all,"):
        res = ["pods", "services", "daemonsets", "deployments", "statefulsets"] + [resource_name(r) for r in words[0].split(",")[1:]]
    if len(words) > 1:
        return [(res[0], n) for n in words[1:]]
    return [(r, None) for r in res]


def match_labels(o, sel):
    if not sel:
        return True
    labels = o["metadata"].get("labels", {})
    for term in sel.split(","):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


def cmd_get(c, a):
    if a.get("--raw"):
        out = c.raw(a.get("--raw"))
        sys.stdout.write(out if out.endswith("\n") or not out else out + "\n")
        return 0
    ns = a.get("-n", "--namespace", default="default")
    all_ns = a.has("-A", "--all-namespaces")
    tg = targets(a, a.pos[1:])
    res_objs = []
    single = len(tg) == 1 and tg[0][1] is not None
    for r, name in tg:
        objs = [o for o in c.get_objects(r, ns, all_ns) if match_labels(o, a.get("-l", "--selector"))]
        if name is not None:
            objs = [o for o in objs if o["metadata"]["name"] == name]
            if not objs:
                if a.has("--ignore-not-found"):
                    continue
                raise LabError(f"Error from server (NotFound): {r} \"{name}\" not found")
        res_objs.append((r, objs))
    out = render(res_objs, a, all_ns, single)
    if not out and not a.get("-o", "--output"):
        sys.stderr.write(f"No resources found{'' if all_ns else ' in ' + ns + ' namespace'}.\n")
    sys.stdout.write(out)
    return 0


def condition_of(o, cond):
    for x in o.get("status", {}).get("conditions", []):
        if x["type"].lower() == cond.lower():
            return x["status"] == "True"
    if cond.lower() == "complete" and o.get("status", {}).get("succeeded"):
        return True
    return False


def cmd_wait(c, a):
    forc = a.get("--for")
    timeout = parse_duration(a.get("--timeout"), 30)
    ns = a.get("-n", "--namespace", default="default")
    all_ns = a.has("-A", "--all-namespaces")
    tg = targets(a, a.pos[1:])
    end = time.time() + timeout
    first = True
    while True:
        pending = []
        found = 0
        for r, name in tg:
            objs = [o for o in c.get_objects(r, ns, all_ns) if match_labels(o, a.get("-l", "--selector"))]
            if name is not None:
                objs = [o for o in objs if o["metadata"]["name"] == name]
                if not objs:
                    if forc == "delete":
                        continue
                    if first:
                        raise LabError(f"Error from server (NotFound): {r} \"{name}\" not found")
            found += len(objs)
            for o in objs:
                if forc == "delete":
                    ok = False
                elif forc.startswith("condition="):
                    ok = condition_of(o, forc.split("=", 1)[1])
                elif forc.startswith("jsonpath="):
                    m = re.match(r"jsonpath=['\"]?\{(.*)\}['\"]?=(.*)$", forc)
                    vals = jsonpath_values(o, m.group(1))
                    ok = bool(vals) and str(vals[0]).lower() == m.group(2).lower()
                else:
                    raise LabError(f"error: unrecognized condition: \"{forc}\"")
                if not ok:
                    pending.append(f"{RESOURCES[r][0].lower()}s/{o['metadata']['name']}")
                elif not a.has("--quiet"):
                    pass
        if first and found == 0 and forc != "delete":
            raise LabError("error: no matching resources found")
        first = False
        if not pending:
            for r, name in tg:
                for o in c.get_objects(r, ns, all_ns):
                    if (name is None or o["metadata"]["name"] == name) and match_labels(o, a.get("-l", "--selector")):
                        print(f"{RESOURCES[r][0].lower()}/{o['metadata']['name']} condition met")
            return 0
        if time.time() >= end:
            raise LabError(f"error: timed out waiting for the condition on {pending[0]}")
        time.sleep(0.5)


def cmd_rollout(c, a):
    if a.pos[1:2] != ["status"]:
        raise LabError("lab kubectl: only `rollout status`")
    ns = a.get("-n", "--namespace", default="default")
    (r, name), = targets(a, a.pos[2:])
    end = time.time() + parse_duration(a.get("--timeout"), 600)
    while True:
        objs = [o for o in c.get_objects(r, ns, False) if o["metadata"]["name"] == name]
        if not objs:
            raise LabError(f"Error from server (NotFound): {r} \"{name}\" not found")
        st = objs[0]["status"]
        if r == "daemonsets":
            done = st["desiredNumberScheduled"] > 0 and st["numberReady"] == st["desiredNumberScheduled"]
            if done:
                print(f"daemon set \"{name}\" successfully rolled out")
                return 0
            msg = f"Waiting for daemon set \"{name}\" rollout to finish: {st['numberReady']} of {st['desiredNumberScheduled']} updated pods are available..."
        else:
            want = objs[0]["spec"].get("replicas", 1)
            if st["readyReplicas"] >= want:
                print(f"deployment \"{name}\" successfully rolled out")
                return 0
            msg = f"Waiting for deployment \"{name}\" rollout to finish: {st['readyReplicas']} of {want} updated replicas are available..."
        if time.time() >= end:
            print(msg)
            raise LabError("error: timed out waiting for the condition")
        time.sleep(0.5)


METALLB_URL = re.compile(r"^https://raw\.githubusercontent\.com/metallb/metallb/(v[\d.]+)/config/manifests/metallb-native\.yaml$")


def manifest_docs(c, src):
    if src == "-":
        return load_yaml_docs(sys.stdin.read())
    m = METALLB_URL.match(src)
    if m:
        return [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "metallb-system"}},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "controller", "namespace": "metallb-system",
             "labels": {"app": "metallb", "component": "controller"}},
             "spec": {"replicas": 1, "template": {"metadata": {"labels": {"app": "metallb", "component": "controller"}}}}},
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "speaker", "namespace": "metallb-system",
             "labels": {"app": "metallb", "component": "speaker"}},
             "spec": {"template": {"metadata": {"labels": {"app": "metallb", "component": "speaker"}}}}},
        ]
    if re.match(r"^https?://", src):
        raise LabError(f"error: unable to read URL \"{src}\": the lab knows only the pinned MetalLB manifest")
    with open(src) as f:
        return load_yaml_docs(f.read())


def deep_merge(dst, src):
    for k, v in src.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def size_bytes(size):
    m = re.match(r"^(\d+)(Ki|Mi|Gi|Ti)?$", str(size))
    if not m:
        return str(size)
    return str(int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[m.group(2)])


def take_backup(c, doc):
    """A Longhorn Backup (what a RecurringJob of task `backup` creates): the volume's contents as
    of now copied to the backup target; Completed at once, or Error when the volume is gone."""
    vol = doc["metadata"].get("labels", {}).get("backup-volume") or doc.get("spec", {}).get("volumeName", "")
    v = c.store.get("volumes.longhorn.io", "longhorn-system", vol) if vol else None
    name = doc["metadata"]["name"]
    if not v:
        doc["status"] = {"state": "Error", "volumeName": vol, "messages": {"error": f"volume {vol} not found"}}
        return
    now = rfc3339(time.time())
    c.etcd.put(BACKUP_STORE + name, c.etcd.get(VOLUME_DATA + vol) or "[]")
    doc["status"] = {"state": "Completed", "progress": 100, "volumeName": vol,
                     "url": BACKUP_URL.format(backup=name, volume=vol),
                     "volumeSize": size_bytes(v["spec"].get("size", "0")),
                     "snapshotCreatedAt": now, "backupCreatedAt": now}


def restore_volume(c, doc):
    """A Volume with `spec.fromBackup`: its contents are the backup's; `restoreRequired` turns
    false when they are in place. A URL no backup has stays `restoreRequired: true` (as a failed
    restore does), so `kubectl wait` on it times out."""
    url = doc["spec"]["fromBackup"]
    q = urllib.parse.parse_qs(url.partition("?")[2])
    name = (q.get("backup") or [""])[0]
    data = c.etcd.get(BACKUP_STORE + name) if name else None
    vol = doc["metadata"]["name"]
    if data is None:
        doc["status"] = {"state": "detached", "robustness": "unknown", "restoreRequired": True,
                         "conditions": [{"type": "Restore", "status": "False", "message": f"backup {url} not found"}]}
        return
    c.etcd.put(VOLUME_DATA + vol, data)
    doc["status"] = {"state": "detached", "robustness": "healthy", "restoreRequired": False,
                     "restoredFrom": url}


def apply_obj(c, doc, ns_default, verb="apply"):
    kind = doc.get("kind")
    res = KIND_TO_RESOURCE.get(kind)
    if not res:
        raise LabError(f"error: resource mapping not found for kind \"{kind}\": ensure CRDs are installed first")
    md = doc.setdefault("metadata", {})
    ns = md.get("namespace") or ns_default
    if namespaced(res):
        md["namespace"] = ns
        if not c.store.get("namespaces", None, ns):
            raise LabError(f"Error from server (NotFound): namespaces \"{ns}\" not found")
    old = c.store.get(res, md.get("namespace"), md["name"])
    if old and verb == "create":
        raise LabError(f"Error from server (AlreadyExists): {res} \"{md['name']}\" already exists")
    if old:
        status = old.get("status")
        md["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        md["uid"] = old["metadata"]["uid"]
        if status and res not in ("services",):
            doc.setdefault("status", status)
    if res == "secrets" and "stringData" in doc:
        import base64

        doc.setdefault("data", {}).update({k: base64.b64encode(str(v).encode()).decode() for k, v in doc.pop("stringData").items()})
    if res == "backups.longhorn.io" and not old:
        take_backup(c, doc)
    elif res == "volumes.longhorn.io" and not old and doc.get("spec", {}).get("fromBackup"):
        restore_volume(c, doc)
    if res == "persistentvolumeclaims" and not old:
        c.bind_pvc(doc)
    else:
        c.store.put(res, doc)
    if res in ("deployments", "statefulsets"):
        c.reconcile(res, doc)
    word = RESOURCES[res][0].lower() + (("." + RESOURCES[res][1].split("/")[0]) if "." in RESOURCES[res][1] else "")
    print(f"{word}/{md['name']} {'configured' if old else 'created'}")


def cmd_apply(c, a, verb="apply"):
    src = a.get("-f", "--filename")
    if not src:
        raise LabError("error: must specify one of -f and -k")
    ns = a.get("-n", "--namespace", default="default")
    for doc in manifest_docs(c, src):
        apply_obj(c, doc, ns, verb)
    return 0


def cmd_create(c, a):
    what = a.pos[1] if len(a.pos) > 1 else ""
    ns = a.get("-n", "--namespace", default="default")
    if what in ("namespace", "ns"):
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": a.pos[2]}}
    elif what == "secret" and a.pos[2:3] == ["generic"]:
        import base64

        data = {}
        lits = [v for k, v in a.flags.items() if k == "--from-literal"]
        for lit in lits:
            k, v = lit.split("=", 1)
            data[k] = v
        env_file = a.get("--from-env-file")
        if env_file:
            with open(env_file) as f:
                for line in f.read().splitlines():
                    if line and not line.startswith("#") and "=" in line:
                        k, v = line.split("=", 1)
                        data[k] = v
        obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": a.pos[3], "namespace": ns},
               "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    elif a.get("-f", "--filename"):
        return cmd_apply(c, a, "create")
    else:
        raise LabError(f"lab kubectl: create {what} is not modelled")
    if a.get("--dry-run") == "client":
        o = a.get("-o", "--output", default="")
        sys.stdout.write(dump_yaml(obj) if o == "yaml" else json.dumps(obj, indent=4) + "\n" if o == "json"
                         else f"{obj['kind'].lower()}/{obj['metadata']['name']} created (dry run)\n")
        return 0
    apply_obj(c, obj, ns, "create")
    return 0


def cmd_patch(c, a):
    ns = a.get("-n", "--namespace", default="default")
    (r, name), = targets(a, a.pos[1:])
    o = c.store.get(r, ns, name)
    if not o:
        raise LabError(f"Error from server (NotFound): {r} \"{name}\" not found")
    patch = json.loads(a.get("-p", "--patch"))
    deep_merge(o, patch)
    c.store.put(r, o)
    if r in ("deployments", "statefulsets"):
        c.reconcile(r, o)
    print(f"{RESOURCES[r][0].lower()}/{name} patched")
    return 0


def delete_obj(c, r, ns, name):
    o = c.store.get(r, ns, name)
    if not o:
        return False
    c.store.delete(r, ns, name)
    if r in ("deployments", "statefulsets", "daemonsets"):
        for p in c.store.list("pods", ns):
            if p["metadata"].get("ownerReferences", [{}])[0].get("name") == name:
                c.store.delete("pods", ns, p["metadata"]["name"])
    if r == "persistentvolumeclaims":
        # Dynamic PVs (reclaim policy Delete) go with their claim, and the Longhorn volume and its
        # data with them; a Retain PV (the restore's static ones) stays, Released.
        pv = c.store.get("persistentvolumes", None, o.get("spec", {}).get("volumeName", ""))
        if pv and pv.get("spec", {}).get("persistentVolumeReclaimPolicy", "Delete") == "Delete":
            delete_obj(c, "persistentvolumes", None, pv["metadata"]["name"])
            delete_obj(c, "volumes.longhorn.io", "longhorn-system", pv["metadata"]["name"])
    if r == "volumes.longhorn.io":
        c.etcd.delete(VOLUME_DATA + name)
    if r == "namespaces":
        for res in RESOURCES:
            if namespaced(res):
                for x in c.store.list(res, name):
                    delete_obj(c, res, name, x["metadata"]["name"])
    if r == "nodes":
        c.etcd.delete("/lab/hb/" + name)
        for p in c.store.list("pods"):
            if p["spec"].get("nodeName") == name:
                p["spec"]["nodeName"] = c.schedule(exclude=(name,))
                c.store.put("pods", p)
    return True


def cmd_delete(c, a):
    ns = a.get("-n", "--namespace", default="default")
    words = a.pos[1:]
    if len(words) == 1 and "/" not in words[0] and not a.has("--all"):
        raise LabError("error: resource(s) were provided, but no name was specified")
    tg = targets(a, words)
    for r, name in tg:
        names = [name] if name else [o["metadata"]["name"] for o in c.store.list(r, ns)]
        for n in names:
            if delete_obj(c, r, ns, n):
                print(f"{RESOURCES[r][0].lower()} \"{n}\" deleted")
            elif not a.has("--ignore-not-found"):
                raise LabError(f"Error from server (NotFound): {r} \"{n}\" not found")
    return 0


def cmd_scale(c, a):
    ns = a.get("-n", "--namespace", default="default")
    n = int(a.get("--replicas"))
    words = a.pos[1:]
    if a.has("--all"):
        tg = [(resource_name(words[0]), o["metadata"]["name"]) for o in c.store.list(resource_name(words[0]), ns)]
    else:
        tg = targets(a, words)
    for r, name in tg:
        o = c.store.get(r, ns, name)
        if not o:
            raise LabError(f"Error from server (NotFound): {r} \"{name}\" not found")
        o.setdefault("spec", {})["replicas"] = n
        c.store.put(r, o)
        c.reconcile(r, o)
        print(f"{RESOURCES[r][0].lower()}.apps/{name} scaled")
    return 0


def set_cordon(c, name, on):
    n = c.store.get("nodes", None, name)
    if not n:
        raise LabError(f"Error from server (NotFound): nodes \"{name}\" not found")
    was = bool(n.get("spec", {}).get("unschedulable"))
    n.setdefault("spec", {})["unschedulable"] = on
    if not on:
        n["spec"].pop("unschedulable")
    c.store.put("nodes", n)
    print(f"node/{name} {'already ' if was == on else ''}{'cordoned' if on else 'uncordoned'}")


def cmd_drain(c, a):
    name = a.pos[1]
    set_cordon(c, name, True)
    pods = [p for p in c.pods() if p["spec"].get("nodeName") == name]
    ds = [p for p in pods if p["metadata"].get("ownerReferences", [{}])[0].get("kind") == "DaemonSet"]
    if ds and not a.has("--ignore-daemonsets"):
        raise LabError(f"error: unable to drain node \"{name}\" due to error: cannot delete DaemonSet-managed Pods "
                       f"(use --ignore-daemonsets to ignore): {', '.join(p['metadata']['namespace'] + '/' + p['metadata']['name'] for p in ds)}, continuing command...\n"
                       f"There are pending nodes to be drained:\n {name}")
    evict = [p for p in pods if p not in ds]
    empty = [p for p in evict if any("emptyDir" in v for v in p["spec"].get("volumes", []))]
    if empty and not a.has("--delete-emptydir-data"):
        raise LabError(f"error: unable to drain node \"{name}\" due to error: cannot delete Pods with local storage "
                       f"(use --delete-emptydir-data to override): {', '.join(p['metadata']['namespace'] + '/' + p['metadata']['name'] for p in empty)}")
    if ds:
        print(f"Warning: ignoring DaemonSet-managed Pods: {', '.join(p['metadata']['namespace'] + '/' + p['metadata']['name'] for p in ds)}")
    delay = float(c.timing().get("evict_seconds", 1))
    for p in evict:
        print(f"evicting pod {p['metadata']['namespace']}/{p['metadata']['name']}", flush=True)
        time.sleep(delay)
        stored = c.store.get("pods", p["metadata"]["namespace"], p["metadata"]["name"])
        if stored:
            stored["spec"]["nodeName"] = c.schedule(exclude=(name,))
            c.store.put("pods", stored)
        print(f"pod/{p['metadata']['name']} evicted", flush=True)
    print(f"node/{name} drained")
    return 0


def cmd_exec(c, a):
    ns = a.get("-n", "--namespace", default="default")
    (r, name), = targets(a, a.pos[1:2])
    pods = [p for p in c.pods(ns) if p["metadata"].get("ownerReferences", [{}])[0].get("name") == name
            and p["status"]["conditions"][0]["status"] == "True"]
    if not pods:
        raise LabError(f"error: unable to upgrade connection: no running pod for {r}/{name}")
    cmd = " ".join(a.rest)
    if cmd.startswith("cilium-dbg status") or cmd.startswith("cilium status"):
        print("OK")
        return 0
    raise LabError(f"lab kubectl exec: `{cmd}` is not modelled")


def kubectl(argv):
    a = Args(argv)
    verb = a.pos[0] if a.pos else ""
    if verb == "version":
        print(f"Client Version: {CLIENT_VERSION}\nKustomize Version: v5.6.0")
        if not a.has("--client"):
            c = Cluster(a)
            print(f"Server Version: {json.loads(c.raw('/version'))['gitVersion']}")
        return 0
    if verb == "explain":
        print("FIELDS: (lab)")
        return 0
    c = Cluster(a)
    fn = {"get": cmd_get, "wait": cmd_wait, "rollout": cmd_rollout, "apply": cmd_apply, "create": cmd_create,
          "patch": cmd_patch, "delete": cmd_delete, "scale": cmd_scale, "drain": cmd_drain, "exec": cmd_exec}.get(verb)
    if verb in ("cordon", "uncordon"):
        for n in a.pos[1:]:
            set_cordon(c, n, verb == "cordon")
        return 0
    if not fn:
        raise LabError(f"lab kubectl: `{verb}` is not modelled")
    return fn(c, a)


# --------------------------------------------------------------------------------- helm


def helm(argv):
    a = Args(argv)
    verb = a.pos[0] if a.pos else ""
    if verb == "version":
        print("v3.18.4+lab")
        return 0
    if verb == "repo":
        if a.pos[1:2] == ["add"]:
            print(f"\"{a.pos[2]}\" has been added to your repositories")
        else:
            print("Update Complete. ⎈Happy Helming!⎈")
        return 0
    c = Cluster(a)
    if verb == "list":
        print("NAME\tNAMESPACE\tREVISION\tSTATUS\tCHART")
        for k, v in c.etcd.range("/lab/helm/"):
            r = json.loads(v)
            print(f"{r['name']}\t{r['namespace']}\t{r['revision']}\tdeployed\t{r['chart']}-{r['version']}")
        return 0
    if verb in ("upgrade", "install"):
        name, chart = a.pos[1], a.pos[2]
        ns = a.get("-n", "--namespace", default="default")
        if chart != "longhorn/longhorn":
            raise LabError(f"Error: lab helm knows only longhorn/longhorn, not {chart}")
        if not c.store.get("namespaces", None, ns):
            if not a.has("--create-namespace"):
                raise LabError(f"Error: create: failed to create: namespaces \"{ns}\" not found")
            c.store.put("namespaces", {"metadata": {"name": ns}})
        sets = dict(s.split("=", 1) for s in a.sets)
        c.store.put("daemonsets", {"metadata": {"name": "longhorn-manager", "namespace": ns, "labels": {"app": "longhorn-manager"}},
                                   "spec": {"template": {"metadata": {"labels": {"app": "longhorn-manager"}}}}})
        sc = {"metadata": {"name": "longhorn", "annotations": {}}, "provisioner": "driver.longhorn.io"}
        if sets.get("persistence.defaultClass", "true") == "true":
            sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] = "true"
        c.store.put("storageclasses", sc)
        if not c.store.get("backuptargets.longhorn.io", ns, "default"):
            c.store.put("backuptargets.longhorn.io", {"metadata": {"name": "default", "namespace": ns}, "spec": {}})
        key = f"/lab/helm/{ns}/{name}"
        old = json.loads(c.etcd.get(key) or '{"revision": 0}')
        c.etcd.put(key, json.dumps({"name": name, "namespace": ns, "chart": "longhorn",
                                    "version": a.get("--version", default="1.12.2"), "revision": old["revision"] + 1}))
        if a.has("--wait"):
            end = time.time() + parse_duration(a.get("--timeout"), 300)
            while True:
                st = [o for o in c.get_objects("daemonsets", ns, False) if o["metadata"]["name"] == "longhorn-manager"][0]["status"]
                if st["numberReady"] == st["desiredNumberScheduled"]:
                    break
                if time.time() >= end:
                    raise LabError("Error: UPGRADE FAILED: context deadline exceeded (longhorn-manager not ready: iscsid must run on every node)")
                time.sleep(0.5)
        print(f"Release \"{name}\" has been upgraded. Happy Helming!\nSTATUS: deployed")
        return 0
    raise LabError(f"lab helm: `{verb}` is not modelled")


# --------------------------------------------------------------------------------- load balancer


def lb_backend(c, ip, port, method, body):
    """(status, text) of a request to a LoadBalancer address: the Service holding `ip`:`port`,
    a Ready pod it selects, and that pod's app. The lab runs one app, the DR canary (image
    lab/canary): GET answers `canary-ok` and the lines on its volume, POST appends
    "<time> <body>" to them. The volume is the pod's first PVC's Longhorn volume; a missing or
    still-restoring volume is an error, as the real app would fail to start without it."""
    for s in c.get_objects("services", None, True):
        spec = s.get("spec", {})
        ing = s.get("status", {}).get("loadBalancer", {}).get("ingress") or []
        if spec.get("type") != "LoadBalancer" or not ing or ing[0]["ip"] != ip:
            continue
        if not any(int(p.get("port", 0)) == port for p in spec.get("ports", [])):
            continue
        ns = s["metadata"]["namespace"]
        sel = spec.get("selector", {})
        pods = [p for p in c.pods(ns) if p["status"]["conditions"][0]["status"] == "True"
                and all(p["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not pods:
            return 503, f"no endpoints available for service {ns}/{s['metadata']['name']}"
        ref = pods[0]["metadata"].get("ownerReferences", [{}])[0]
        owner = c.store.get(KIND_TO_RESOURCE.get(ref.get("kind"), "deployments"), ns, ref.get("name", ""))
        tmpl = (owner or {}).get("spec", {}).get("template", {}).get("spec", {})
        image = (tmpl.get("containers") or [{}])[0].get("image", "")
        if image.split(":")[0] != CANARY_IMAGE:
            return 502, f"the lab runs no app for image {image!r} (only {CANARY_IMAGE})"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in tmpl.get("volumes", []) if "persistentVolumeClaim" in v]
        pvc = c.store.get("persistentvolumeclaims", ns, claims[0]) if claims else None
        vol = (pvc or {}).get("spec", {}).get("volumeName", "")
        v = c.store.get("volumes.longhorn.io", "longhorn-system", vol) if vol else None
        data = c.etcd.get(VOLUME_DATA + vol) if v else None
        if not pvc or (pvc.get("status", {}).get("phase") != "Bound") or not v or data is None \
                or v.get("status", {}).get("restoreRequired"):
            return 500, f"canary: volume of claim {ns}/{claims[0] if claims else '?'} is not available"
        lines = json.loads(data)
        if method == "POST":
            lines.append(f"{rfc3339(time.time())} {body.strip()}")
            c.etcd.put(VOLUME_DATA + vol, json.dumps(lines))
            return 201, lines[-1] + "\n"
        return 200, "canary-ok\n" + "".join(x + "\n" for x in lines)
    return 503, f"no LoadBalancer service holds {ip}:{port}"


def serve_lb(argv):
    """`kubectl.py lab-lb IP[:PORT]`: answers HTTP on a MetalLB pool address as the announced
    Service would (the lab's MetalLB assigns addresses but announces nothing). Runs until killed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ip, _, port = argv[0].partition(":")
    port = int(port or 80)

    class Handler(BaseHTTPRequestHandler):
        def answer(self, method):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n).decode() if n else ""
            try:
                st, text = lb_backend(Cluster(Args([])), ip, port, method, body)
            except Exception as e:  # noqa: BLE001 (a server: every failure is an answer)
                st, text = 503, f"upstream unavailable: {e}"
            raw = text.encode()
            self.send_response(st)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):  # noqa: N802 (http.server's names)
            self.answer("GET")

        def do_POST(self):  # noqa: N802
            self.answer("POST")

        def log_message(self, fmt, *args):
            sys.stderr.write("lab-lb: " + (fmt % args) + "\n")

    ThreadingHTTPServer((ip, port), Handler).serve_forever()
    return 0


def main():
    tool = os.path.basename(sys.argv[0])
    if sys.argv[1:2] == ["lab-lb"]:
        return serve_lb(sys.argv[2:])
    try:
        return helm(sys.argv[1:]) if tool == "helm" else kubectl(sys.argv[1:])
    except LabError as e:
        sys.stderr.write(str(e) + "\n")
        return e.code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
