#!/usr/bin/env python3
"""The lab's S3: where `etcd-s3: true` in a server's config.yaml sends etcd snapshots.

A real S3 API (moto's S3 and IAM, from PyPI `moto[server]`) on the lab address `<subnet>.6:9000`,
over TLS with the lab's certificate (RKE2 speaks TLS to `etcd-s3-endpoint` unless
`etcd-s3-insecure`), with one bucket (the deploy's `s3_bucket`) and one IAM user whose access
key and secret are the env file's `S3_ACCESS_KEY` / `S3_SECRET_KEY`: every request must be
SigV4-signed with them (a wrong key or secret is refused, as by a real S3). The objects live in
this process only: `scripts/lab down` loses them, as losing the bucket would.

`python3 lab/s3.py serve --dir LAB` is the daemon (started by `up` in lab.py); `up(lab_dir, lab,
env_file)` is what lab.py calls (`down` kills the daemon by its `s3_pid`).
"""

import json
import os
import shutil
import subprocess
import sys
import time

S3_PORT = 9000
BUCKET = "rke2-etcd"
REGION = "us-east-1"


def serve(lab_dir):
    # Authentication on from the first request (moto's default is none).
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    import ssl

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.s3.models import s3_backends
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    with open(os.path.join(lab_dir, "s3.json")) as f:
        conf = json.load(f)
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
    iam.create_user(REGION, "rke2-etcd-snapshots")
    key = iam.create_access_key("rke2-etcd-snapshots")
    # moto generates AKIA… keys; the lab's keys are the env file's (what the deploy writes).
    iam.access_keys.pop(key.physical_resource_id, None)
    key.access_key_id, key.secret_access_key = conf["access_key"], conf["secret_key"]
    iam.access_keys[key.physical_resource_id] = key
    iam.put_user_policy("rke2-etcd-snapshots", "s3", json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].create_bucket(conf["bucket"], REGION)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(lab_dir, "tls", "s3-cert.pem"), os.path.join(lab_dir, "tls", "s3-key.pem"))
    app = DomainDispatcherApplication(create_backend_app)
    srv = make_server(conf["ip"], conf["port"], app, threaded=True, ssl_context=ctx)
    srv.serve_forever()


def up(lab_dir, lab, env_file):
    """Start the lab's S3 and append its settings to the env file; returns the daemon's pid."""
    ip = f"{lab['subnet']}.6"
    env = {}
    with open(env_file) as f:
        for line in f:
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export "):].strip().split("=", 1)
                env[k] = v.strip('"')
    conf = {"ip": ip, "port": S3_PORT, "bucket": BUCKET,
            "access_key": env["S3_ACCESS_KEY"], "secret_key": env["S3_SECRET_KEY"]}
    with open(os.path.join(lab_dir, "s3.json"), "w") as f:
        json.dump(conf, f)
    # Its own leaf from the lab CA (the CA the nodes trust), for its address.
    tls = os.path.join(lab_dir, "tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    with open(os.path.join(tls, "s3.ext"), "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip}\n")
    for cmd in (["openssl", "req", *ec, "-keyout", f"{tls}/s3-key.pem", "-out", f"{tls}/s3.csr", "-subj", "/CN=rke2-lab-s3"],
                ["openssl", "x509", "-req", "-in", f"{tls}/s3.csr", "-CA", f"{tls}/ca.pem", "-CAkey", f"{tls}/ca-key.pem",
                 "-CAcreateserial", "-days", "7", "-extfile", f"{tls}/s3.ext", "-out", f"{tls}/s3-cert.pem"]):
        subprocess.run(cmd, check=True, capture_output=True)
    log = open(os.path.join(lab_dir, "s3.log"), "ab")
    # moto comes from PyPI (scripts/test: `python3 -m pip install --user moto[server]`), so it may
    # be in the `python3` on PATH rather than in the system Python that runs the lab.
    python = sys.executable
    for cand in (sys.executable, shutil.which("python3")):
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('moto') is None)"
        if cand and subprocess.run([cand, "-c", probe], capture_output=True).returncode == 0:
            python = cand
            break
    p = subprocess.Popen([python, os.path.realpath(__file__), "serve", "--dir", lab_dir],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    import socket

    end = time.time() + 30
    while time.time() < end:
        if p.poll() is not None:
            raise SystemExit(f"lab: the S3 stand-in exited (is moto[server] installed? see {lab_dir}/s3.log)")
        try:
            socket.create_connection((ip, S3_PORT), 0.3).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise SystemExit(f"lab: the S3 stand-in did not listen on {ip}:{S3_PORT} (see {lab_dir}/s3.log)")
    lab["s3_pid"] = p.pid
    with open(env_file, "a") as f:
        f.write(f"# The lab's S3 (lab/s3.py): pass it to the deploy as --set s3_endpoint=$RKE2_S3_ENDPOINT\n"
                f"export RKE2_S3_ENDPOINT=\"{ip}:{S3_PORT}\"\n"
                f"export RKE2_S3_BUCKET=\"{BUCKET}\"\n")
    return p.pid


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve" and sys.argv[2] == "--dir":
        serve(sys.argv[3])
    else:
        raise SystemExit("usage: s3.py serve --dir LAB")
