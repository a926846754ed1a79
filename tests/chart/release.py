"""A Helm release of the chart in the test control plane, and the operator run with its identity.

The control plane has no kubelet, so the chart's Deployment never gets a pod. The operator runs
out of cluster instead (`melange run --kubeconfig`), with a token of the chart's ServiceAccount
from the TokenRequest API: exactly the permissions the chart's RBAC grants, nothing more, and with
the arguments of the chart's Deployment, expanded the way the kubelet expands them. So does the
router (`melange route`, router.enabled), with its own ServiceAccount's token.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from base64 import b64encode
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import yaml
from kubernetes import client

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import Kube
from tests.e2e.operator_process import MELANGE, LoggedProcess, wait_healthy

from .helm import CHART, helm, values_args

TOKEN_SECONDS = 3600


class Release:
    """`helm install|upgrade|uninstall` of the chart as `name` in `namespace`."""

    def __init__(
        self,
        control_plane: ControlPlane,
        name: str,
        namespace: str,
        workdir: Path,
        owns_crd: bool = False,
    ) -> None:
        self.control_plane = control_plane
        self.name = name
        self.namespace = namespace
        self.workdir = workdir
        self.fullname = f"{name}-melange-operator"
        self.installed = False
        # The session's control plane has the CRD already (tests/conftest.py applies it), and only
        # one release can own it: other releases install with crds.install false.
        self.owns_crd = owns_crd

    def _helm(self, *args: str, values: Mapping[str, Any] | None = None) -> str:
        return helm(
            *args,
            "--namespace",
            self.namespace,
            *values_args(values, self.workdir),
            env=self.control_plane.env(),
        )

    def _helm_values(self, *args: str, values: Mapping[str, Any] | None) -> str:
        """install or upgrade: the values, after crds.install false unless this release owns
        the CRD (a later --values file wins)."""
        base = None if self.owns_crd else {"crds": {"install": False}}
        return helm(
            *args,
            "--namespace",
            self.namespace,
            *values_args(base, self.workdir),
            *values_args(values, self.workdir),
            env=self.control_plane.env(),
        )

    def install(self, values: Mapping[str, Any] | None = None, chart: Path = CHART) -> str:
        # No --wait: without a kubelet the operator's pod never becomes ready.
        out = self._helm_values("install", self.name, str(chart), values=values)
        self.installed = True
        return out

    def upgrade(self, values: Mapping[str, Any] | None = None, chart: Path = CHART) -> str:
        return self._helm_values("upgrade", self.name, str(chart), values=values)

    def uninstall(self) -> str:
        out = self._helm("uninstall", self.name)
        self.installed = False
        return out

    def kubeconfig(self, kube: Kube, path: Path, service_account: str | None = None) -> Path:
        """A kubeconfig with a fresh token of one of the chart's ServiceAccounts (the operator's
        unless named) and the cluster's CA."""
        account = service_account or self.fullname
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS)
        )
        status = (
            client.CoreV1Api(kube.api_client)
            .create_namespaced_service_account_token(account, self.namespace, request)
            .status
        )
        assert status is not None
        token = status.token
        user = f"system:serviceaccount:{self.namespace}:{account}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": self.control_plane.server,
                        "certificate-authority-data": b64encode(
                            self.control_plane.ca_path.read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_args(deployment: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """The operator container's command and args, with $(VAR) expanded from `env` as the kubelet
    does (an unknown $(VAR) stays as written)."""
    pod = deployment["spec"]["template"]["spec"]
    (operator,) = [c for c in pod["containers"] if c["name"] == "operator"]
    return [
        re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)
        for arg in [*operator["command"], *operator["args"]]
    ]


class OperatorRun(LoggedProcess):
    """The chart's `melange run ...` as one pod of its Deployment runs it, but out of cluster: the
    Deployment's arguments, POD_NAME and POD_NAMESPACE as the downward API sets them, plus
    `--kubeconfig` and loopback ports for the probe and the metrics."""

    def __init__(
        self,
        kubeconfig: Path,
        deployment: Mapping[str, Any],
        log_path: Path,
        pod_name: str = "operator-0",
    ) -> None:
        self.kubeconfig = kubeconfig
        self.pod_name = pod_name
        self.pod_env = {"POD_NAME": pod_name, "POD_NAMESPACE": deployment["metadata"]["namespace"]}
        self.args = pod_args(deployment, self.pod_env)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        health, metrics = _free_port(), _free_port()
        self._log = self.log_path.open("ab")
        command, args = self.args[:2], self.args[2:]
        assert command == ["melange", "run"], command
        local = ("--liveness=", "--metrics-port=", "--metrics-address=", "--verbose")
        argv = [MELANGE, "run", *(a for a in args if not a.startswith(local))]
        argv += [
            f"--kubeconfig={self.kubeconfig}",
            f"--liveness=http://127.0.0.1:{health}/healthz",
            f"--metrics-port={metrics}",
            "--metrics-address=127.0.0.1",
            "--verbose",
        ]
        # No admin credentials from the environment: the kubeconfig is the only identity.
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**env, **self.pod_env}
        )

        wait_healthy(self.process, f"http://127.0.0.1:{health}/healthz", self.log)


class RouterRun(LoggedProcess):
    """The chart's `melange route ...` as one pod of the router's Deployment runs it, but out of
    cluster: the Deployment's command and arguments, with a loopback address and a free port
    instead of 0.0.0.0:8080, and KUBECONFIG holding the router ServiceAccount's token."""

    def __init__(self, kubeconfig: Path, deployment: Mapping[str, Any], log_path: Path) -> None:
        pod = deployment["spec"]["template"]["spec"]
        (router,) = [c for c in pod["containers"] if c["name"] == "router"]
        self.args: list[str] = [*router["command"], *router["args"]]
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command, args = self.args[:2], self.args[2:]
        assert command == ["melange", "route"], command
        argv = [MELANGE, "route", *(a for a in args if not a.startswith(("--host=", "--port=")))]
        argv += ["--host=127.0.0.1", f"--port={port}"]
        # Its only identity is the kubeconfig: no admin credentials, no in-cluster configuration.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
        }
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**env, "KUBECONFIG": str(self.kubeconfig)},
        )
        wait_healthy(self.process, f"{self.url}/healthz", self.log)
