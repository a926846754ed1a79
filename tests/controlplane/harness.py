"""A real Kubernetes control plane (etcd + kube-apiserver) for end-to-end tests.

Why this exists: the operator's behaviour that matters (RBAC, the ``/scale``
subresource, watches, admission, server-side validation) is only trustworthy
against a real API server, and no cluster, Docker or release download is
available here. ``tests/controlplane/build.sh`` builds etcd, kube-apiserver and
helm from Go modules into a cache outside the repo; this module starts the two
servers on free loopback ports with freshly generated credentials and hands the
test a kubeconfig.

There is no kubelet, scheduler or controller-manager: Deployments get no
ReplicaSets or Pods, namespaces never finish deleting and nothing is garbage
collected. Use a fresh namespace per test and assert on objects, not on pods.

Usage::

    with ControlPlane() as cp:
        client = kubernetes.config.new_client_from_config(str(cp.kubeconfig_path))
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ADMIN_GROUP",
    "ADMIN_USER",
    "AUDIT_POLICY",
    "AUDIT_POLICY_ALL_REQUESTS",
    "BUILD_HINT",
    "ControlPlane",
    "ControlPlaneError",
    "MissingBinaryError",
    "default_bin_dir",
]

#: How a developer gets the binaries; quoted in every "missing binary" error.
BUILD_HINT = "run `bash tests/controlplane/build.sh`"
#: The static-token user. ``system:masters`` bypasses RBAC, like cluster-admin.
ADMIN_USER = "melange-admin"
ADMIN_GROUP = "system:masters"
#: How much of each process log goes into a startup error.
_LOG_TAIL_CHARS = 6000


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  verbs: ["create", "update", "patch", "delete"]
- level: None
"""

#: Writes with their bodies, and every read (get, list, watch) without one: what a test that
#: counts all of a client's requests uses (``ControlPlane(audit=True, audit_policy=...)``).
AUDIT_POLICY_ALL_REQUESTS = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Request
  verbs: ["create", "update", "patch", "delete"]
- level: Metadata
"""


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (the message includes the logs)."""


class MissingBinaryError(ControlPlaneError, FileNotFoundError):
    """A binary built by ``build.sh`` is not where the harness looks for it."""


def default_bin_dir() -> Path:
    """Return the binary cache that ``build.sh`` fills (``$MELANGE_TEST_BIN`` or the default).

    The same default lives in build.sh, so both agree without configuration.
    """
    env = os.environ.get("MELANGE_TEST_BIN")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "melange-operator" / "bin"


def _find_binaries(bin_dir: Path, *names: str) -> list[Path]:
    """Return ``bin_dir/current/<name>`` for each name, or raise naming every missing one.

    Listing all missing binaries at once saves a build-run-fail round trip.
    """
    paths = [bin_dir / "current" / name for name in names]
    missing = [p for p in paths if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        what = ", ".join(f"{p.name} (expected at {p})" for p in missing)
        raise MissingBinaryError(
            f"missing test binary: {what}; "
            f"MELANGE_TEST_BIN={os.environ.get('MELANGE_TEST_BIN', '<unset>')}; "
            f"{BUILD_HINT} to build it"
        )
    return paths


def _free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct free TCP ports on 127.0.0.1.

    All sockets are held open until every port is chosen so the kernel cannot
    hand out the same port twice. There is a small window before the servers
    bind them; a collision shows up as a startup error with the log.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


class _Credentials:
    """Generated CA, serving certificate, service-account key pair and admin token.

    Generated per run rather than checked in, so no key material lives in the
    repo and clients verify TLS against a real CA (no insecure-skip-tls-verify).
    """

    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        not_before = now - datetime.timedelta(minutes=5)
        not_after = now + datetime.timedelta(days=1)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "melange-test-ca")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )

        serving_key = ec.generate_private_key(ec.SECP256R1())
        serving_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(serving_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )

        # kube-apiserver signs service-account tokens with this key (TokenRequest
        # works without a controller-manager); RSA is what it expects by default.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        self.ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_path = _write(directory / "ca.crt", self.ca_pem, 0o644)
        self.cert_path = _write(
            directory / "apiserver.crt", serving_cert.public_bytes(serialization.Encoding.PEM)
        )
        self.key_path = _write(directory / "apiserver.key", _pem_key(serving_key))
        self.sa_key_path = _write(directory / "sa.key", _pem_key(sa_key))
        self.sa_pub_path = _write(
            directory / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        self.token = secrets.token_urlsafe(32)
        # Static token file: token,user,uid,"group1,group2". Still supported, and the
        # simplest way to get an admin without client certificates.
        self.token_file = _write(
            directory / "tokens.csv",
            f'{self.token},{ADMIN_USER},uid-{ADMIN_USER},"{ADMIN_GROUP}"\n'.encode(),
        )


class _Process:
    """A server process whose stdout+stderr go to a log file, so failures can show it."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")  # a restarted server appends to its log
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-_LOG_TAIL_CHARS:]

    def stop(self, timeout: float) -> None:
        """Terminate (SIGTERM lets etcd and the apiserver shut down), then kill."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self._log.close()


class ControlPlane:
    """etcd + kube-apiserver on loopback, with a generated CA and an admin token.

    Attributes available after start (or inside ``with``):

    * ``server``: ``https://127.0.0.1:PORT``
    * ``token``: bearer token of ``melange-admin`` (group ``system:masters``)
    * ``ca_path``: PEM CA certificate that signed the serving certificate
    * ``kubeconfig_path``: kubeconfig with server, CA data and token
    * ``etcd_url``, ``workdir``, ``kube_apiserver``, ``etcd``, ``helm`` (binary paths)
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        startup_timeout: float = 90.0,
        stop_timeout: float = 15.0,
        extra_apiserver_args: list[str] | None = None,
        audit: bool = False,
        audit_policy: str = AUDIT_POLICY,
    ) -> None:
        """Locate the binaries now, so a missing build fails before anything starts.

        ``startup_timeout`` is generous because a cold kube-apiserver on 2 cores
        takes several seconds to install its bootstrap RBAC and API groups.
        """
        self.bin_dir = bin_dir if bin_dir is not None else default_bin_dir()
        self.etcd, self.kube_apiserver = _find_binaries(self.bin_dir, "etcd", "kube-apiserver")
        # helm is optional for the control plane itself; expose it when present.
        helm = self.bin_dir / "current" / "helm"
        self.helm: Path | None = helm if helm.is_file() else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_apiserver_args = list(extra_apiserver_args or [])
        self.audit = audit
        self.audit_policy = audit_policy
        self.audit_log = Path()

        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._stopped: tuple[list[str], list[str]] | None = None  # argv of both, while stopped
        self.workdir = Path()
        self.server = ""
        self.etcd_url = ""
        self.token = ""
        self.ca_path = Path()
        self.kubeconfig_path = Path()

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, then kube-apiserver, and wait until both are healthy.

        On any failure everything already started is stopped before the error
        propagates, so a failed start never leaks processes.
        """
        if self._tmp is not None:
            raise ControlPlaneError("ControlPlane already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="melange-controlplane-")
        self.workdir = Path(self._tmp.name)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        creds = _Credentials(self.workdir)
        self.token = creds.token
        self.ca_path = creds.ca_path
        etcd_port, peer_port, api_port = _free_ports(3)
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self.server = f"https://127.0.0.1:{api_port}"

        self._etcd = _Process(
            "etcd",
            [
                str(self.etcd),
                "--name=melange-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=melange-test={peer_url}",
                # Test data is throwaway: skipping fsync makes etcd much faster.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            self.workdir / "etcd.log",
        )
        deadline = time.monotonic() + self.startup_timeout
        self._wait_ready(self._etcd, f"{self.etcd_url}/health", deadline, self._etcd_healthy)

        self._apiserver = _Process(
            "kube-apiserver",
            [
                str(self.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--tls-cert-file={creds.cert_path}",
                f"--tls-private-key-file={creds.key_path}",
                f"--token-auth-file={creds.token_file}",
                # RBAC so that tests of the chart's Role/ClusterRole mean something.
                "--authorization-mode=RBAC",
                # Required: the apiserver refuses to start without an issuer and keys.
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={creds.sa_pub_path}",
                f"--service-account-signing-key-file={creds.sa_key_path}",
                "--service-cluster-ip-range=10.0.0.0/24",
                # No controller-manager creates the default ServiceAccount, so this
                # plugin would reject every pod; envtest disables it for the same reason.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                *self._audit_args(),
                *self.extra_apiserver_args,
            ],
            self.workdir / "kube-apiserver.log",
        )
        self._wait_ready(self._apiserver, f"{self.server}/readyz", deadline, self._apiserver_ready)
        self.kubeconfig_path = self._write_kubeconfig(creds)

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (reverse start order), and delete the workdir."""
        for proc in (self._apiserver, self._etcd):
            if proc is not None:
                proc.stop(self.stop_timeout)
        self._apiserver = self._etcd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- outages -----------------------------------------------------------------

    def stop_servers(self) -> None:
        """Stop kube-apiserver and etcd as an outage would, keeping everything needed to come back.

        etcd's data directory, the ports, the certificates, the tokens, the kubeconfig and the
        audit log all stay; `start_servers` brings the same control plane back with its data.
        """
        if self._etcd is None or self._apiserver is None:
            raise ControlPlaneError("the control plane is not running")
        self._stopped = (self._etcd.argv, self._apiserver.argv)
        for proc in (self._apiserver, self._etcd):
            proc.stop(self.stop_timeout)
        self._apiserver = self._etcd = None

    def start_servers(self) -> None:
        """Start etcd and kube-apiserver again, as `stop_servers` left them, and wait until ready."""
        if self._stopped is None:
            raise ControlPlaneError("start_servers needs a stop_servers first")
        etcd_argv, apiserver_argv = self._stopped
        deadline = time.monotonic() + self.startup_timeout
        self._etcd = _Process("etcd", etcd_argv, self.workdir / "etcd.log")
        self._wait_ready(self._etcd, f"{self.etcd_url}/health", deadline, self._etcd_healthy)
        self._apiserver = _Process(
            "kube-apiserver", apiserver_argv, self.workdir / "kube-apiserver.log"
        )
        self._wait_ready(self._apiserver, f"{self.server}/readyz", deadline, self._apiserver_ready)
        self._stopped = None

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision, as its periodic compaction does:
        a watch from an older resourceVersion is then answered 410 Gone. Returns the revision."""

        def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{self.etcd_url}/v3/{path}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
            return answer

        revision = int(call("kv/range", {"key": b64encode(b"/").decode()})["header"]["revision"])
        call("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def restart(self, pause_seconds: float) -> None:
        """An outage of `pause_seconds`: both servers down, then back with their data."""
        self.stop_servers()
        time.sleep(pause_seconds)
        self.start_servers()

    # -- other identities ----------------------------------------------------------

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig for the ServiceAccount `namespace/name` (created if missing).

        Its token comes from the TokenRequest API, signed by the API server itself, so the
        identity is `system:serviceaccount:<namespace>:<name>` and RBAC applies to it in full
        (unlike the admin, which is in `system:masters`).
        """
        accounts = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        try:
            self._admin_request(
                "POST",
                accounts,
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
            )
        except urllib.error.HTTPError as err:
            if err.code != 409:  # already there
                raise
        answer = self._admin_request(
            "POST",
            f"{accounts}/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        token = str(answer["status"]["token"])
        user = f"system:serviceaccount:{namespace}:{name}"
        return self._write_kubeconfig_for(
            user, token, self.workdir / f"kubeconfig-{namespace}-{name}"
        )

    def as_identity(self, kubeconfig: Path) -> ControlPlane:
        """This control plane seen through another kubeconfig (for a client that takes a
        ControlPlane, e.g. an operator process); it shares the audit log and owns no process,
        so stopping it stops nothing."""
        view = copy.copy(self)
        view._tmp = view._etcd = view._apiserver = None
        view._stopped = None
        view.kubeconfig_path = kubeconfig
        return view

    def _admin_request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.server}{path}",
            data=json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30, context=self._ssl_context()) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
        return answer

    # -- helpers -----------------------------------------------------------------

    def _audit_args(self) -> list[str]:
        """With `audit`: every write (with its request body) goes to `audit_log`, one JSON line each;
        the way tests count who wrote what (the user agent names the writer)."""
        if not self.audit:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(self.audit_policy)
        self.audit_log = self.workdir / "audit.log"
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log's events so far (writes only, at the ResponseComplete stage)."""
        if not self.audit_log.is_file():
            return []
        lines = self.audit_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, ``kopf run``) that use this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig_path)}

    def logs(self) -> str:
        """The tail of both process logs, for assertion messages."""
        parts = [
            f"--- {p.name} log ({p.log_path}) ---\n{p.log_tail()}"
            for p in (self._etcd, self._apiserver)
            if p is not None
        ]
        return "\n".join(parts)

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def _etcd_healthy(self, url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = json.loads(resp.read())
        return bool(body.get("health") == "true")

    def _apiserver_ready(self, url: str) -> bool:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5, context=self._ssl_context()) as resp:
            return bool(resp.status == 200)

    def _wait_ready(
        self,
        proc: _Process,
        url: str,
        deadline: float,
        probe: Callable[[str], bool],
    ) -> None:
        """Poll ``probe(url)`` until it is true, the process dies, or the deadline passes."""
        last_error = "not polled yet"
        while True:
            code = proc.popen.poll()
            if code is not None:
                raise ControlPlaneError(
                    f"{proc.name} exited with code {code} during startup\n{self.logs()}"
                )
            try:
                if probe(url):
                    return
                last_error = "probe returned not ready"
            except urllib.error.HTTPError as err:
                # /readyz answers 500 with the failing checks while it starts up.
                last_error = f"HTTP {err.code}: {err.read()[-500:].decode(errors='replace')}"
            except (OSError, ValueError) as err:
                last_error = repr(err)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{proc.name} not ready at {url} within {self.startup_timeout:.0f}s "
                    f"(last error: {last_error})\n{self.logs()}"
                )
            time.sleep(0.25)

    def _write_kubeconfig(self, creds: _Credentials) -> Path:
        """Write a kubeconfig for the admin token, with the CA inline (no file refs)."""
        return self._write_kubeconfig_for(ADMIN_USER, self.token, self.workdir / "kubeconfig")

    def _write_kubeconfig_for(self, user: str, token: str, path: Path) -> Path:
        """Write a kubeconfig for `user`'s bearer token, with the CA inline (no file refs)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "melange-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64encode(self.ca_path.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "melange-test",
                    "context": {"cluster": "melange-test", "user": user},
                }
            ],
            "current-context": "melange-test",
        }
        return _write(path, yaml.safe_dump(config, sort_keys=False).encode())

    def version(self) -> str:
        """``kube-apiserver --version`` output, e.g. ``Kubernetes v1.36.3``."""
        out = subprocess.run(
            [str(self.kube_apiserver), "--version"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()
