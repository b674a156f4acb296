"""Least privilege (issue 13), against real servers: Redis ACL users, TLS to Redis, no
credential where a person can read it.

One module-scoped stack: a redis-server started with the dev overlay's ACL file
(deploy/k8s/overlays/dev/redis/users.acl, copied: the test never writes tracked files),
a redis-server with TLS on (mutual TLS: it requires a client certificate; certificates
made here with openssl), the real ``gateway features load``/``import`` commands, and five
``gateway serve`` processes started together: the ACL gateway user, a user missing MGET,
a wrong password, TLS, and TLS with the wrong CA.

The rollout user is tested with raw redis-py commands on ``gw:rollout:*`` and with the
real ``gateway rollout`` CLI (start, status, abort), over ACL and over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from gateway.redisconn import RedisTLS, sync_client
from tests.procs import PYTHON, ROOT, GatewayServer, RedisServer, free_port
from tests.test_import import write_parquet

ACL_FILE = ROOT / "deploy" / "k8s" / "overlays" / "dev" / "redis" / "users.acl"
# The dev overlay's dev-only passwords (its secretGenerator); the ACL file holds their
# SHA-256. test_k8s_security checks the overlay's Secrets carry these.
PASSWORDS = {
    "admin": "dev-only-admin-password",
    "gateway": "dev-only-gateway-password",
    "loader": "dev-only-loader-password",
    "rollout": "dev-only-rollout-password",
}
WRONG_PASSWORD = "wrong-Pa55word-for-the-leak-test"
NOPERM_PASSWORD = "no-mget-Pa55word"
USERS, ITEMS = 300, 200


def acl_url(server: RedisServer, user: str, password: str | None = None) -> str:
    return f"redis://{user}:{password or PASSWORDS[user]}@127.0.0.1:{server.port}/0"


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, username="admin", password=PASSWORDS["admin"])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``gateway ...`` as an operator runs it, with only the given GATEWAY_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def predict(gw: GatewayServer, user: str = "u1") -> dict[str, Any]:
    body = json.dumps({"user_id": user, "item_ids": ["i1", "i2", "i3"]}).encode()
    req = urllib.request.Request(
        f"{gw.url}/predict", body, {"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())


def readyz(gw: GatewayServer) -> dict[str, Any]:
    status, body = get(f"{gw.url}/readyz")
    assert status == 200, body  # ready either way: a degraded gateway answers from fallback
    return json.loads(body)


# ---- TLS material ------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed
    by it, and a second CA that signed nothing here (the wrong CA). EC P-256: fast."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "wrong-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
            "-subj", f"/CN={ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder,
        )  # fmt: skip
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (folder / f"{name}.ext").write_text(ext)
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
            cwd=folder,
        )  # fmt: skip
    names = ("ca.crt", "wrong-ca.crt", "client.crt", "client.key", "server.crt", "server.key")
    return {n: folder / n for n in names}


# ---- the stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    acl: RedisServer
    tls: RedisServer
    tls_port: int
    certs: dict[str, Path]
    gateways: dict[str, GatewayServer]
    cli_runs: dict[str, subprocess.CompletedProcess[str]]
    tmp: Path

    @property
    def tls_url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

    def tls_env(self, ca: str = "ca.crt") -> dict[str, str]:
        return {
            "GATEWAY_REDIS_URL": self.tls_url,
            "GATEWAY_REDIS_TLS_CA_FILE": str(self.certs[ca]),
            "GATEWAY_REDIS_TLS_CERT_FILE": str(self.certs["client.crt"]),
            "GATEWAY_REDIS_TLS_KEY_FILE": str(self.certs["client.key"]),
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("security")
    acl_copy = tmp / "users.acl"
    shutil.copyfile(ACL_FILE, acl_copy)
    certs = make_certs(tmp)
    tls_port = free_port()
    acl = RedisServer(extra_args=("--aclfile", str(acl_copy))).start()
    tls = RedisServer(
        extra_args=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(certs["server.crt"]),
            "--tls-key-file", str(certs["server.key"]),
            "--tls-ca-cert-file", str(certs["ca.crt"]),
            "--tls-auth-clients", "yes",
        )
    ).start()  # fmt: skip
    gateways: dict[str, GatewayServer] = {}
    try:
        s = Stack(acl, tls, tls_port, certs, gateways, {}, tmp)
        # The loader's real command, its URL (and password) from the environment. Twice,
        # the second deleting the first generation (SCAN + UNLINK, under its ACL user).
        for seed, keep in (("7", "1"), ("8", "0")):
            s.cli_runs[f"load-acl-{seed}"] = cli(
                "features", "load", "--users", str(USERS), "--items", str(ITEMS),
                "--seed", seed, "--keep", keep, "--no-progress",
                env={"GATEWAY_REDIS_URL": acl_url(acl, "loader")},
            )  # fmt: skip
        s.cli_runs["load-tls"] = cli(
            "features", "load", "--users", str(USERS), "--items", str(ITEMS), "--no-progress",
            env=s.tls_env(),
        )  # fmt: skip
        # A user with the gateway's rights but MGET: it may read the pointer and run the
        # rollout, not MGET the vectors.
        admin(acl).acl_setuser(
            "gateway-nomget", enabled=True, passwords=[f"+{NOPERM_PASSWORD}"],
            keys=["%R~feat:*", "~gw:rollout:*"],
            commands=["+get", "+exists", "+@read", "+@write", "+multi", "+exec", "+watch",
                      "+unwatch", "+discard", "-mget", "-@dangerous"],
        )  # fmt: skip
        envs = {
            "acl": {"GATEWAY_REDIS_URL": acl_url(acl, "gateway"), "GATEWAY_LOG_LEVEL": "DEBUG"},
            "noperm": {"GATEWAY_REDIS_URL": acl_url(acl, "gateway-nomget", NOPERM_PASSWORD)},
            "wrongpw": {
                "GATEWAY_REDIS_URL": acl_url(acl, "gateway", WRONG_PASSWORD),
                "GATEWAY_LOG_LEVEL": "DEBUG",
            },
            "tls": s.tls_env(),
            "badca": s.tls_env("wrong-ca.crt"),
        }
        for name, env in envs.items():
            gateways[name] = GatewayServer(
                env={"GATEWAY_HEALTH_INTERVAL_S": "0.5", **env}, log_path=tmp / f"gw-{name}.log"
            )
        with ThreadPoolExecutor(len(gateways)) as pool:
            started = pool.map(lambda gw: gw.start(timeout=60, ready=True), gateways.values())
            # Meanwhile: the commands that fail, and the importer over TLS.
            s.cli_runs["load-wrongpw"] = cli(
                "features", "load", "--no-progress",
                env={"GATEWAY_REDIS_URL": acl_url(acl, "loader", WRONG_PASSWORD)},
            )  # fmt: skip
            s.cli_runs["load-badca"] = cli(
                "features", "load", "--no-progress", env=s.tls_env("wrong-ca.crt")
            )
            users, items = write_parquet(tmp, USERS, ITEMS, seed=9)
            s.cli_runs["import-tls"] = cli(
                "features", "import", "--users", str(users), "--items", str(items),
                "--no-progress", "--tls-ca-file", str(certs["ca.crt"]),
                env={k: v for k, v in s.tls_env().items() if "CA_FILE" not in k},
            )  # fmt: skip
            s.cli_runs["serve-bad-url"] = cli(
                "serve", env={"GATEWAY_REDIS_URL": f"http://gateway:{WRONG_PASSWORD}@h:1/0"}
            )
            list(started)
        yield s
    finally:
        for gw in gateways.values():
            gw.stop()
        acl.stop()
        tls.stop()


def log_of(stack: Stack, name: str) -> str:
    path = stack.gateways[name].log_path
    assert path is not None
    return path.read_text()


# ---- ACL ---------------------------------------------------------------------------------


def _denied(client: redis.Redis, *command: Any) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)


def test_acl_users_do_their_jobs_and_nothing_else(stack: Stack) -> None:
    """The loader loads (and deletes old generations), the gateway serves from the model,
    the rollout user works on its keys, with no ACL denial logged; then each user is
    refused everything outside its job."""
    for run in ("load-acl-7", "load-acl-8"):
        out = stack.cli_runs[run]
        assert out.returncode == 0, out.stderr
    gw = stack.gateways["acl"]
    assert readyz(gw)["status"] == "ready"
    answer = predict(gw)
    assert answer["fallback"] is None and answer["missing"] == {"user": False, "items": 0}

    # The rollout CLI's user, through the helper that CLI is to use.
    rollout = sync_client(acl_url(stack.acl, "rollout"))
    rollout.set("gw:rollout:state", "canary")
    rollout.hset("gw:rollout:lease", mapping={"holder": "cli", "until": "1"})
    assert rollout.incr("gw:rollout:counter:requests") == 1
    assert rollout.eval("return redis.call('incrby', KEYS[1], 2)", 1, "gw:rollout:n") == 2
    rollout.pexpire("gw:rollout:lease", 60_000)
    # The gateway's own rollout and shared-counter keys: read and write.
    gateway = sync_client(acl_url(stack.acl, "gateway"))
    assert gateway.get("gw:rollout:state") == b"canary"
    assert gateway.hincrby("gw:rollout:counter:shared", "canary", 1) == 1
    assert gateway.get("feat:current") and gateway.mget(["feat:x:u:u1"]) == [None]

    log = admin(stack.acl).acl_log()
    denials = [
        e for e in log if e["username"] in ("gateway", "loader", "rollout")
        and e["reason"] != "auth"
    ]  # fmt: skip
    assert not denials, f"a user's own job was refused: {denials}"

    # Now everything outside each job.
    loader = sync_client(acl_url(stack.acl, "loader"))
    for client in (gateway, rollout, loader):
        for command in (
            ("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("KEYS", "*"), ("ACL", "LIST"),
            ("SWAPDB", "0", "1"), ("SHUTDOWN",), ("CLIENT", "KILL", "ID", "1"),
        ):  # fmt: skip
            _denied(client, *command)
    for command in (
        ("SET", "feat:current", "x"), ("DEL", "feat:current"), ("UNLINK", "feat:x:u:u1"),
        ("MSET", "feat:x:u:u1", "v"), ("SCAN", "0"),
    ):  # fmt: skip
        _denied(gateway, *command)
    for command in (("GET", "feat:current"), ("SET", "feat:current", "x"), ("SCAN", "0")):
        _denied(rollout, *command)
    for command in (("GET", "gw:rollout:state"), ("SET", "gw:rollout:state", "x")):
        _denied(loader, *command)
    # Unauthenticated: PING (the readiness probe) and nothing else.
    anonymous = redis.Redis(port=stack.acl.port)
    assert anonymous.ping()
    _denied(anonymous, "GET", "feat:current")


def test_rollout_cli_works_as_its_acl_user_and_over_tls(stack: Stack) -> None:
    """``gateway rollout`` start/status/abort as the ``rollout`` ACL user (URL from
    GATEWAY_REDIS_URL, no denial logged) and status over TLS with the CA and client
    certificate from the environment. A model of its own, so no gateway here follows it."""
    admin(stack.acl).acl_log_reset()  # earlier tests' deliberate denials
    repo = stack.tmp / "rollout-repo"
    for v in ("1", "2"):
        (repo / "ctrx" / v).mkdir(parents=True, exist_ok=True)
    env = {"GATEWAY_REDIS_URL": acl_url(stack.acl, "rollout")}
    model = ("--model", "ctrx")
    out = cli(
        "rollout", "start", "--candidate-version", "2", "--primary-version", "1",
        "--mode", "shadow", "--model-repository", str(repo), *model, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = cli("rollout", "status", "--json", *model, env=env)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["mode"] == "shadow" and status["candidate"]["version"] == "2", status
    out = cli("rollout", "abort", *model, env=env)
    assert out.returncode == 0, out.stderr
    after = json.loads(cli("rollout", "status", "--json", *model, env=env).stdout)
    assert after["state"] == "rolled_back" and after["last_decision"]["action"] == "abort", after
    denials = [e for e in admin(stack.acl).acl_log() if e["username"] == "rollout"]
    assert not [e for e in denials if e["reason"] != "auth"], denials
    assert PASSWORDS["rollout"] not in out.stdout + out.stderr

    tls_env = {"GATEWAY_REDIS_URL": stack.tls_url, **stack.tls_env()}
    out = cli("rollout", "status", "--json", *model, env=tls_env)
    assert out.returncode == 0, out.stderr
    bad = cli("rollout", "status", *model, env={"GATEWAY_REDIS_URL": stack.tls_url})
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), bad.stderr


def test_gateway_missing_a_permission_says_so_and_answers_from_fallback(stack: Stack) -> None:
    gw = stack.gateways["noperm"]
    body = readyz(gw)
    assert body["status"] == "degraded"
    error = body["dependencies"]["features"]["error"]
    assert error.startswith("Redis ACL denied a command (NOPERM)"), error
    answer = predict(gw)
    assert answer["fallback"] == {"reason": "features_unavailable", "stage": "features"}
    lines = [ln for ln in log_of(stack, "noperm").splitlines() if "NOPERM" in ln]
    assert len(lines) == 1 and "dependency features: Redis ACL denied" in lines[0], lines
    assert "Traceback" not in log_of(stack, "noperm")


def test_wrong_password_is_a_credentials_error(stack: Stack) -> None:
    body = readyz(stack.gateways["wrongpw"])
    assert body["status"] == "degraded"
    assert "refused our credentials (WRONGPASS" in body["dependencies"]["features"]["error"]
    assert predict(stack.gateways["wrongpw"])["fallback"]["reason"] == "features_unavailable"
    out = stack.cli_runs["load-wrongpw"]
    assert out.returncode == 2
    assert out.stderr.startswith("error: Redis at redis://loader:***@"), out.stderr
    assert "refused our credentials" in out.stderr and "Traceback" not in out.stderr


# ---- TLS ---------------------------------------------------------------------------------


def test_everything_connects_over_tls(stack: Stack) -> None:
    """Loader, importer (CA as a flag, client certificate from the environment), the
    gateway (redis-py health check and the raw RESP request path) and the rollout helper,
    all to a Redis that accepts only TLS clients with a certificate from its CA."""
    for run in ("load-tls", "import-tls"):
        out = stack.cli_runs[run]
        assert out.returncode == 0, out.stderr
    gw = stack.gateways["tls"]
    assert readyz(gw)["status"] == "ready"
    answer = predict(gw)
    assert answer["fallback"] is None and answer["missing"] == {"user": False, "items": 0}
    tls = RedisTLS(stack.certs["ca.crt"], stack.certs["client.crt"], stack.certs["client.key"])
    client = sync_client(stack.tls_url, tls)
    client.set("gw:rollout:state", "tls")
    assert client.get("gw:rollout:state") == b"tls"
    # Without a client certificate this Redis refuses the handshake: one line, no traceback.
    with pytest.raises(Exception, match="Redis at rediss://127.0.0.1:[0-9]+/0 refused us") as info:
        sync_client(stack.tls_url, RedisTLS(stack.certs["ca.crt"]))
    assert "\n" not in str(info.value)


def test_wrong_ca_is_refused_with_one_clear_line(stack: Stack) -> None:
    out = stack.cli_runs["load-badca"]
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "certificate is not trusted" in lines[0] and "check the CA file" in lines[0]
    gw = stack.gateways["badca"]
    body = readyz(gw)
    assert body["status"] == "degraded"
    assert body["dependencies"]["features"]["error"].startswith(
        "TLS: Redis's certificate is not trusted"
    )
    assert predict(gw)["fallback"]["reason"] == "features_unavailable"
    log = log_of(stack, "badca")
    assert "Traceback" not in log
    # One line from each part that talks to Redis: the feature store and the rollout.
    said = [ln for ln in log.splitlines() if "certificate is not trusted" in ln]
    assert len([ln for ln in said if "dependency features" in ln]) == 1, said
    assert len([ln for ln in said if "gateway.rollout" in ln]) == 1, said
    assert len(said) == 2, said


# ---- no credential where a person can read it ----------------------------------------------


def test_no_credential_in_logs_readyz_metrics_or_errors(stack: Stack) -> None:
    secrets = [WRONG_PASSWORD, NOPERM_PASSWORD, PASSWORDS["gateway"], PASSWORDS["loader"]]
    seen: dict[str, str] = {}
    for name, gw in stack.gateways.items():
        seen[f"{name} log"] = log_of(stack, name)
        for path in ("/readyz", "/metrics", "/healthz"):
            seen[f"{name} {path}"] = get(gw.url + path)[1]
    for run, out in stack.cli_runs.items():
        seen[f"{run} output"] = out.stdout + out.stderr
    # What is grepped holds the lines that would carry a password if anything did.
    assert "dependency features: Redis refused our credentials" in seen["wrongpw log"]
    assert "refused our credentials" in seen["wrongpw /readyz"]
    bad_url = stack.cli_runs["serve-bad-url"]
    assert bad_url.returncode == 2 and "GATEWAY_REDIS_URL" in bad_url.stderr, bad_url.stderr
    assert "Traceback" not in bad_url.stderr
    leaks = [(where, s) for where, text in seen.items() for s in secrets if s in text]
    assert not leaks, f"a password is readable in: {leaks}"


# ---- the manifests: Secrets, NetworkPolicies, Triton -------------------------------------

OVERLAYS = ("overlays/dev", "overlays/prod")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# The one peer outside the namespace: the Prometheus Operator's pods in "monitoring".
PROMETHEUS = (
    {"kubernetes.io/metadata.name": "monitoring"},
    {"app.kubernetes.io/name": "prometheus"},
)


@dataclass
class Pods:
    """A workload's pod template: its labels and its containers' ports (name -> number)."""

    name: str
    labels: dict[str, str]
    ports: dict[str, int]
    spec: dict[str, Any]


def pods_of(docs: list[dict]) -> list[Pods]:
    found = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            tpl = d["spec"]["template"]
            ports = {
                p.get("name", str(p["containerPort"])): p["containerPort"]
                for c in tpl["spec"]["containers"]
                for p in c.get("ports", [])
            }
            found.append(Pods(d["metadata"]["name"], tpl["metadata"].get("labels", {}), ports, tpl))
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    from tests.test_deploy import render

    return {o: render(o) for o in OVERLAYS}


def _kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_real_pods_and_ports(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    """Every policy's pod selector and every peer selects a real pod template, every port
    is a port of each selected container, and together they allow exactly the table in
    base/networkpolicies.yaml."""
    docs = manifests[overlay]
    pods = pods_of(docs)
    policies = _kind(docs, "NetworkPolicy")
    deny = policies.pop("default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    reach: dict[tuple[str, int], set[str]] = {}
    for name, pol in policies.items():
        spec = pol["spec"]
        assert spec["policyTypes"] == ["Ingress"], name
        targets = [p for p in pods if selects(spec["podSelector"], p.labels)]
        assert targets, f"NetworkPolicy {name} selects no Deployment/StatefulSet/Job pod"
        for rule in spec["ingress"]:
            sources: set[str] = set()
            for peer in rule.get("from", [{"*": True}]):
                assert "ipBlock" not in peer, name
                if "*" in peer:
                    sources.add("*")
                elif "namespaceSelector" in peer:
                    ns, pod = peer["namespaceSelector"], peer.get("podSelector", {})
                    assert (ns.get("matchLabels"), pod.get("matchLabels")) == PROMETHEUS, peer
                    sources.add("prometheus")
                else:
                    matched = [p.name for p in pods if selects(peer["podSelector"], p.labels)]
                    assert matched, f"NetworkPolicy {name}: peer {peer} selects no pod"
                    sources.update(matched)
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP"
                for t in targets:
                    number = t.ports.get(port["port"], port["port"])
                    assert number in t.ports.values(), f"{name}: {t.name} has no port {port}"
                    reach.setdefault((t.name, number), set()).update(sources)
    expected = {
        ("gateway", 8080): {"*"},
        ("triton", 8000): {"gateway"},  # Triton HTTP: the HTTP transport (and nothing else)
        ("triton", 8001): {"gateway"},  # Triton gRPC
        ("triton", 8002): {"prometheus"},  # Triton metrics
    }
    if overlay.endswith("dev"):
        expected[("redis", 6379)] = {"gateway", "features-load"}
    assert reach == expected


def _secret_url(secrets: dict[str, dict], name: str) -> str:
    return base64.b64decode(secrets[name]["data"]["redis-url"]).decode().strip()


def _env_secret(container: dict[str, Any], var: str) -> str:
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if e["name"] == var]
    assert ref["key"] == "redis-url"
    return str(ref["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets_and_triton_is_closed(
    overlay: str, manifests: dict[str, list[dict]]
) -> None:
    docs = manifests[overlay]
    for cm in _kind(docs, "ConfigMap").values():
        for key, value in cm.get("data", {}).items():
            assert "REDIS_URL" not in key and "PASSWORD" not in key.upper(), (cm, key)
            assert not any(p in value for p in PASSWORDS.values()), (cm["metadata"], key)
    pods = {p.name: p for p in pods_of(docs)}
    for p in pods.values():
        for c in p.spec["spec"]["containers"]:
            command = " ".join(c.get("command", []) + c.get("args", []))
            assert "redis://" not in command and "--redis-url" not in command, command
            assert all("hostPort" not in port for port in c.get("ports", []))
    gw_secret = _env_secret(pods["gateway"].spec["spec"]["containers"][0], "GATEWAY_REDIS_URL")
    secrets = _kind(docs, "Secret")
    if overlay.endswith("prod"):
        assert not secrets, "prod creates no Secret: it references the operator's"
        assert gw_secret == "gateway-redis"
    else:
        acl = ACL_FILE.read_text()
        load_secret = _env_secret(
            pods["features-load"].spec["spec"]["containers"][0], "GATEWAY_REDIS_URL"
        )
        rollout_secret = next(n for n in secrets if n.startswith("rollout-redis"))
        named = ((gw_secret, "gateway"), (load_secret, "loader"), (rollout_secret, "rollout"))
        for secret, user in named:
            url = urlsplit(_secret_url(secrets, secret))
            assert (url.username, url.password) == (user, PASSWORDS[user]), secret
            digest = hashlib.sha256(PASSWORDS[user].encode()).hexdigest()
            assert f"user {user} on #{digest} " in acl, f"{user}'s password is not the ACL's"
        users = next(s for n, s in secrets.items() if n.startswith("redis-users"))
        assert base64.b64decode(users["data"]["users.acl"]).decode() == acl
        redis_pod = pods["redis"].spec["spec"]
        assert "--aclfile" in redis_pod["containers"][0]["args"]
        assert redis_pod["volumes"][0]["secret"]["secretName"] == users["metadata"]["name"]

    # Triton: model control off, stated; its ports in-cluster only.
    args = pods["triton"].spec["spec"]["containers"][0]["args"]
    assert "--model-control-mode=none" in args
    for svc in _kind(docs, "Service").values():
        assert svc["spec"].get("type", "ClusterIP") in ("ClusterIP", "ExternalName"), svc
    assert not _kind(docs, "Ingress")
