"""`melange run` at start-up, as a separate process: outside a pod, no credentials or a server that
cannot be used is one `error:` line and exit code 2, at once; in a pod (its environment: the
service's address and a service-account directory) it waits for the API server, alive but not
ready, and becomes ready once the server answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml

from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually
from .operator_process import MELANGE, _free_port, terminate

pytestmark = pytest.mark.e2e

#: A hang is a failure: the command must have exited long before this.
EXIT_TIMEOUT = 60


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """No kubeconfig, no pod: only what the test sets."""
    dropped = {
        "KUBECONFIG",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "MELANGE_SERVICE_ACCOUNT_DIR",
    }
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**env, "HOME": str(home), **extra}


def melange_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MELANGE, "run", "--metrics-port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=False,
    )


def assert_one_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert result.stdout == ""
    return lines[0]


def write_kubeconfig(path: Path, server: str, user: dict[str, str], ca: Path | None) -> Path:
    cluster: dict[str, str] = {"server": server}
    if ca is not None:
        cluster["certificate-authority"] = str(ca)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


# -- outside a pod: one error line, exit code 2 ----------------------------------------------


def test_no_kubeconfig(tmp_path: Path) -> None:
    default = tmp_path / ".kube" / "config"
    assert_one_error(melange_run(clean_env(tmp_path)), str(default), "no Kubernetes credentials")
    # KUBECONFIG set but empty: the same default
    assert_one_error(melange_run(clean_env(tmp_path, KUBECONFIG="")), str(default))
    missing = tmp_path / "nope.yaml"
    assert_one_error(melange_run(clean_env(tmp_path, KUBECONFIG=str(missing))), str(missing))
    assert_one_error(melange_run(clean_env(tmp_path), "--kubeconfig", str(missing)), str(missing))


def test_broken_kubeconfig(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("clusters: [\n")
    assert_one_error(melange_run(clean_env(tmp_path), "--kubeconfig", str(broken)), str(broken))
    no_context = write_kubeconfig(
        tmp_path / "no-context.yaml", "https://127.0.0.1:1", {"token": "x"}, None
    )
    document = yaml.safe_load(no_context.read_text())
    document["current-context"] = "gone"
    no_context.write_text(yaml.safe_dump(document))
    assert_one_error(
        melange_run(clean_env(tmp_path), "--kubeconfig", str(no_context)), str(no_context), "gone"
    )


def test_unreachable_api_server(tmp_path: Path) -> None:
    server = f"https://127.0.0.1:{_free_port()}"  # closed: nothing listens there
    config = write_kubeconfig(tmp_path / "closed.yaml", server, {"token": "x"}, None)
    line = assert_one_error(
        melange_run(clean_env(tmp_path, KUBECONFIG=str(config))), server, str(config)
    )
    assert "cannot reach" in line, line
    assert "refused" in line, line


@pytest.mark.parametrize(
    ("user", "status"),
    [({"token": "not-a-token"}, "401"), ({}, "403")],  # {}: anonymous
    ids=["bad-token", "anonymous"],
)
def test_credentials_refused(
    control_plane: ControlPlane, kube: Kube, tmp_path: Path, user: dict[str, str], status: str
) -> None:
    config = write_kubeconfig(
        tmp_path / "bad.yaml", control_plane.server, user, control_plane.ca_path
    )
    line = assert_one_error(
        melange_run(clean_env(tmp_path), "--kubeconfig", str(config)),
        control_plane.server,
        str(config),
    )
    assert status in line, line


def test_starts_with_good_credentials(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """The same check lets a usable kubeconfig through: alive and ready at once."""
    port = _free_port()
    process = subprocess.Popen(
        [
            MELANGE,
            "run",
            "-n",
            namespace,
            "--no-leader-elect",
            "--metrics-port",
            "0",
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ],
        env=clean_env(tmp_path, KUBECONFIG=str(control_plane.kubeconfig_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        eventually(lambda: assert_status(process, f"http://127.0.0.1:{port}/readyz", 200))
        assert_status(process, f"http://127.0.0.1:{port}/healthz", 200)
    finally:
        terminate(process)


# -- in a pod: alive, not ready, until the API server answers --------------------------------


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def assert_status(process: subprocess.Popen[bytes], url: str, expected: int) -> None:
    assert process.poll() is None, "the operator exited"
    try:
        assert status(url) == expected
    except OSError as exc:
        raise AssertionError(f"{url}: {exc}") from None


def attempts(log_path: Path, at_least: int) -> None:
    failed = log_path.read_text().count("next attempt in")
    assert failed >= at_least, failed


class Forwarder:
    """A TCP port that forwards to another once `open()` is called; closed (refusing) before."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._server: socket.socket | None = None

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
def service_account(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> Path:
    """What the kubelet mounts in a pod: a ServiceAccount's token (from the TokenRequest API,
    bound to admin rights in `namespace`), the cluster's CA and the namespace."""
    k8s = kubernetes.client
    api = kubernetes.config.new_client_from_config(str(control_plane.kubeconfig_path))
    core = k8s.CoreV1Api(api)
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="operator"))
    )
    k8s.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="operator"),
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="cluster-admin"
            ),
            subjects=[
                k8s.RbacV1Subject(kind="ServiceAccount", name="operator", namespace=namespace)
            ],
        ),
    )
    answer = core.create_namespaced_service_account_token(
        "operator",
        namespace,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        ),
    )
    assert answer.status is not None
    token = str(answer.status.token)
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(control_plane.ca_path.read_bytes())
    (directory / "namespace").write_text(namespace)
    return directory


@pytest.fixture
def forwarder(control_plane: ControlPlane) -> Iterator[Forwarder]:
    target = control_plane.server.removeprefix("https://").rsplit(":", 1)
    proxy = Forwarder(_free_port(), (target[0], int(target[1])))
    try:
        yield proxy
    finally:
        proxy.close()


def test_in_a_pod_waits_for_the_api_server(
    namespace: str, service_account: Path, forwarder: Forwarder, tmp_path: Path
) -> None:
    health = _free_port()
    log_path = tmp_path / "operator.log"
    env = clean_env(
        tmp_path,
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(forwarder.port),  # closed until forwarder.open()
        MELANGE_SERVICE_ACCOUNT_DIR=str(service_account),
    )
    live, ready = f"http://127.0.0.1:{health}/healthz", f"http://127.0.0.1:{health}/readyz"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                MELANGE,
                "run",
                "-n",
                namespace,
                "--no-leader-elect",
                "--metrics-port",
                "0",
                "--liveness",
                live,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Alive, not ready, and still there after a few failed attempts.
        eventually(lambda: assert_status(process, live, 200), timeout=30)
        assert_status(process, ready, 503)
        eventually(lambda: attempts(log_path, 3), timeout=30)
        assert_status(process, live, 200)
        assert_status(process, ready, 503)

        forwarder.open()  # the API server is reachable now, at the service's address
        eventually(lambda: assert_status(process, ready, 200), timeout=60)
        assert_status(process, live, 200)
        time.sleep(1)
        text = log_path.read_text()
        assert "Traceback" not in text, text
        assert f"https://127.0.0.1:{forwarder.port}" in text, text

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT) == 0
    finally:
        terminate(process)
        print(f"--- operator log ---\n{log_path.read_text()[-8000:]}")
