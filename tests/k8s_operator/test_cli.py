"""`specfleet operator manifests` prints valid objects; `specfleet operator run`, as its own process with a
kubeconfig pointing at kmock, creates a SpecFleet's Deployments and answers its liveness probe."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kmock import KubernetesEmulator, Server

from specfleet.cli.main import main

from .test_handlers import declare_resources, fleet_object, live, resource_id

SPECFLEET = Path(sys.executable).with_name("specfleet")


def test_manifests_command_prints_valid_objects(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "specfleet.io/v1alpha1", "kind": "SpecFleet",
                                    "metadata": {"name": "demo"},
                                    "spec": {"drafters": [{"name": "c", "model": "drafter-c"}]}}))
    assert main(["operator", "manifests", str(path)]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} >= {("Deployment", "demo-drafter-c"),
                                                                     ("Service", "demo-router")}
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_manifests_command_explains_a_bad_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("kind: SpecFleet\nmetadata: {name: demo}\nspec: {verifier: {minReplicas: 3, maxReplicas: 1}}\n")
    with pytest.raises(SystemExit, match="minReplicas"):
        main(["operator", "manifests", str(path)])


class KmockThread:
    """kmock serving on loopback from a thread of its own, so a separate operator process can reach it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.k8s: KubernetesEmulator | None = None
        self.url = ""
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)

    async def _serve(self):
        self.stop = asyncio.Event()
        async with KubernetesEmulator() as k8s, Server(k8s):
            declare_resources(k8s)
            k8s.objects["specfleet.io/v1alpha1/specfleets", "default", "demo"] = fleet_object({})
            self.k8s, self.url = k8s, str(k8s.url).rstrip("/")
            self.ready.set()
            await self.stop.wait()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10), "kmock did not start"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_operator_run_process_against_kmock(tmp_path):
    with KmockThread() as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": server.url}}],
            "users": [{"name": "tester", "user": {"token": "kmock-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}]}))
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("SPECFLEET_REDIS_URL", None)
        process = subprocess.Popen(
            [str(SPECFLEET), "operator", "run", "--standalone", "--namespace", "default", "--interval", "0.5",
             "--liveness", f"http://127.0.0.1:{port}/healthz"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            names: set[str] = set()
            while time.monotonic() < deadline and "demo-verifier" not in names:
                time.sleep(0.2)
                names = {name for (res, _, name), obj in list(server.k8s.objects.items())
                         if resource_id(res) == "apps/v1/deployments" and not obj.deleted}
            assert names == {"demo-router", "demo-fusion", "demo-verifier", "demo-drafter-python"}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                assert reply.status == 200
            fleet = live(server.k8s, "specfleet.io/v1alpha1/specfleets", "demo")
            assert "specfleet.io/finalizer" in fleet["metadata"]["finalizers"]
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=20)
        assert process.returncode == 0, output
