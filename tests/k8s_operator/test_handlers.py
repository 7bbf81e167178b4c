"""The kopf handlers against kmock (kopf's Kubernetes API emulator) and the real Redis: a SpecFleet creates its
Deployments, Services, ConfigMaps and Secrets; status is patched; the scale subresource's path drives the verifier
count; scale-down drains pods in Redis before removing them; events record decisions; deletion cleans up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid

import kopf
import pytest
from kmock import KubernetesEmulator, Server

from specfleet.state import StateStore, connect
from specfleet_operator.handlers import make_registry

from .crd_schema import load_crd, spec_schema, validation_errors

NS = "default"
FLEETS = "specfleet.io/v1alpha1/specfleets"
DEPLOYMENTS = "apps/v1/deployments"
BUILTIN = {"apps/v1/deployments": "Deployment", "v1/services": "Service", "v1/configmaps": "ConfigMap",
           "v1/secrets": "Secret", "v1/pods": "Pod", "v1/events": "Event"}
REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT_S = 15.0


def declare_resources(k8s: KubernetesEmulator) -> None:
    verbs = ["get", "list", "watch", "create", "patch", "update", "delete"]
    k8s.resources[FLEETS] = dict(kind="SpecFleet", namespaced=True, singular="specfleet", verbs=verbs,
                                 subresources=["status", "scale"])
    for resource, kind in BUILTIN.items():
        k8s.resources[resource] = dict(kind=kind, namespaced=True, verbs=verbs)
    k8s.resources["v1/namespaces"] = dict(kind="Namespace", namespaced=False, verbs=["get", "list", "watch"])
    k8s.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = dict(
        kind="CustomResourceDefinition", namespaced=False, verbs=["get", "list", "watch"])


def fleet_object(spec: dict) -> dict:
    return {"apiVersion": "specfleet.io/v1alpha1", "kind": "SpecFleet",
            "metadata": {"name": "demo", "namespace": NS, "uid": "uid-demo", "generation": 1,
                         "resourceVersion": "1"},
            "spec": spec}


def live(k8s: KubernetesEmulator, resource: str, name: str) -> dict | None:
    """The stored object, or None when it does not exist (or was deleted)."""
    for (res, namespace, obj_name), obj in k8s.objects.items():
        if resource_id(res) == resource and namespace == NS and obj_name == name and not obj.deleted:
            return obj.raw
    return None


def resource_id(resource) -> str:
    return "/".join(part for part in (resource.group, resource.version, resource.plural) if part)


def names(k8s: KubernetesEmulator, resource: str) -> set[str]:
    return {name for (res, _, name), obj in k8s.objects.items() if resource_id(res) == resource and not obj.deleted}


async def eventually(check, timeout_s: float = TIMEOUT_S, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


class EveryTask(frozenset):
    """For kopf.run_tasks(ignored=...): kopf does not wait 5 s on exit for tasks it considers hung (kmock's request
    handlers, a timer caught mid-step); the test cancels what is left itself."""

    def __contains__(self, task) -> bool:
        return True


@contextlib.asynccontextmanager
async def operator(spec: dict, status: dict | None = None, **registry_kwargs):
    """kmock with one SpecFleet in it (with `status`, as an earlier operator left it) and the operator running
    against it until the block ends."""
    async with KubernetesEmulator() as k8s, Server(k8s):
        declare_resources(k8s)
        k8s.objects["v1/namespaces", None, NS] = {"metadata": {"name": NS}}
        k8s.objects[FLEETS, NS, "demo"] = {**fleet_object(spec), **({"status": status} if status else {})}
        url = str(k8s.url).rstrip("/")
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True  # kmock cannot list cluster-wide namespaces; we name ours
        settings.networking.request_timeout = 10
        registry = make_registry(login=lambda **_: kopf.ConnectionInfo(server=url, insecure=True),
                                 autoscale_interval_s=0.3, **registry_kwargs)
        stop = asyncio.Event()
        before = asyncio.all_tasks()
        tasks = await kopf.spawn_tasks(registry=registry, settings=settings, standalone=True, namespaces=[NS],
                                       stop_flag=stop, memo=kopf.Memo())
        task = asyncio.create_task(kopf.run_tasks(tasks, ignored=EveryTask()))
        try:
            yield k8s
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=TIMEOUT_S)
            # end what kopf left running (a timer caught mid-step) before the server goes away
            leftovers = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
            for leftover in leftovers:
                leftover.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)


def run(coro):
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


SPEC = {"drafters": [{"name": "python", "model": "drafter-python"}, {"name": "suffix", "gpu": False}],
        "verifier": {"replicas": 2}, "autoscaling": {"cooldownSeconds": 0}}


def test_create_makes_owned_objects_and_patches_status():
    async def body():
        async with operator(SPEC) as k8s:
            deployments = await eventually(lambda: (names(k8s, DEPLOYMENTS) == {
                "demo-router", "demo-fusion", "demo-verifier", "demo-drafter-python", "demo-drafter-suffix"}
                and names(k8s, DEPLOYMENTS)), what="the five Deployments")
            status = await eventually(lambda: (live(k8s, FLEETS, "demo") or {}).get("status", {}).get("roles"),
                                      what="status.roles")
            verifier = live(k8s, DEPLOYMENTS, "demo-verifier")
            assert verifier["spec"]["replicas"] == 2
            owner = verifier["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("SpecFleet", "demo",
                                                                                          "uid-demo", True)
            assert names(k8s, "v1/services") >= {"demo-router", "demo-verifier", "demo-drafter-suffix"}
            assert "demo-drafter-python" in names(k8s, "v1/configmaps")
            token = live(k8s, "v1/secrets", "demo-internal-token")
            assert len(base64.b64decode(token["data"]["token"])) >= 16
            full = live(k8s, FLEETS, "demo")["status"]
            assert full["selector"] == ("app.kubernetes.io/component=verifier,app.kubernetes.io/instance=demo,"
                                        "app.kubernetes.io/name=specfleet")
            assert full["observedGeneration"] == 1 and full["ready"] == "0/6"
            assert status["verifier"] == {"desired": 2, "ready": 0, "requested": 2}
            assert validation_errors(spec_schema(), live(k8s, FLEETS, "demo")) == []  # status fits the CRD
            conditions = {c["type"]: c for c in full["conditions"]}
            assert conditions["Ready"]["status"] == "False" and conditions["Scaling"]["status"] == "True"
            # pods become ready (the Deployment controller's job): the status follows
            k8s.objects[DEPLOYMENTS, NS, "demo-verifier"].patch({"status": {"readyReplicas": 2}})
            await eventually(lambda: live(k8s, FLEETS, "demo")["status"].get("replicas") == 2,
                             what="status.replicas = ready verifiers")
            assert deployments  # every name present

    run(body())


def test_drift_is_repaired():
    async def body():
        async with operator(SPEC) as k8s:
            await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-router"), what="the router Deployment")
            k8s.objects[DEPLOYMENTS, NS, "demo-router"].patch({"spec": {"template": {"spec": {"containers": [
                {"name": "router", "image": "evil:latest"}]}}}})
            await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-router")["spec"]["template"]["spec"]["containers"][
                0]["image"] == "ghcr.io/specfleet/specfleet:0.1.0", what="the image put back")

    run(body())


def kubectl_scale(k8s: KubernetesEmulator, replicas: int) -> None:
    """What the API server does for `kubectl scale specfleet/demo --replicas=N`: write N at the CRD's
    specReplicasPath (kmock has no scale subresource of its own)."""
    path = load_crd()["spec"]["versions"][0]["subresources"]["scale"]["specReplicasPath"]
    patch: dict = {}
    node = patch
    parts = path.strip(".").split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = replicas
    fleet = k8s.objects[FLEETS, NS, "demo"]
    fleet.patch({**patch, "metadata": {"generation": fleet.raw["metadata"]["generation"] + 1}})


def test_scale_subresource_sets_the_verifier_count_and_events_record_it():
    async def body():
        async with operator(SPEC) as k8s:
            await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-verifier"), what="the verifier Deployment")
            kubectl_scale(k8s, 4)
            await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["replicas"] == 4,
                             what="verifier Deployment at 4 replicas")
            status = await eventually(lambda: (s := live(k8s, FLEETS, "demo")["status"])["roles"]["verifier"][
                "desired"] == 4 and s, what="status desired 4")
            assert status["observedGeneration"] == 2
            (decision,) = [d for d in status["decisions"] if d["role"] == "verifier"]
            assert (decision["from"], decision["to"]) == (2, 4) and "spec replicas set to 4" in decision["reason"]
            events = await eventually(lambda: [e.raw for (res, _, _), e in k8s.objects.items()
                                               if res.plural == "events" and e.raw.get("reason") == "Scaled"],
                                      what="a Scaled event")
            assert "verifier: 2 -> 4" in events[0]["message"]
            assert events[0]["involvedObject"]["name"] == "demo"

    run(body())


def test_scale_down_drains_in_redis_before_removing(monkeypatch):
    prefix = f"test-op-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("SPECFLEET_KEY_PREFIX", prefix)
    spec = {**SPEC, "verifier": {"replicas": 3}, "redis": {"mode": "external", "url": REDIS_URL},
            "autoscaling": {"enabled": False}}

    async def body():
        store = StateStore(connect(REDIS_URL), prefix=prefix)
        if not await store.ping():
            pytest.skip("no Redis at 127.0.0.1:6379")
        try:
            async with operator(spec, drain_grace_s=0.5) as k8s:
                await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-verifier"), what="the verifier Deployment")
                labels = live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["template"]["metadata"]["labels"]
                inflight = {"demo-verifier-a": 0, "demo-verifier-b": 2, "demo-verifier-c": 1}
                for pod in inflight:  # the ReplicaSet's pods
                    k8s.objects["v1/pods", NS, pod] = {"metadata": {"name": pod, "namespace": NS, "labels": labels}}

                async def publish():  # what each pod's HeartbeatPublisher does: its load every 0.5 s
                    while True:
                        for pod, calls in inflight.items():
                            await store.heartbeat("verifier", pod, {"inflight": calls, "busy_frac": 0.5}, ttl_s=3)
                        await asyncio.sleep(0.5)

                beating = asyncio.create_task(publish())
                await asyncio.sleep(0.2)
                kubectl_scale(k8s, 1)
                # the two with the least work are marked draining; nothing is removed while c has work in flight
                drained = set()
                for _ in range(100):
                    drained = {h["pod"] for h in await store.heartbeats("verifier") if h["draining"]}
                    if drained == {"demo-verifier-a", "demo-verifier-c"}:
                        break
                    await asyncio.sleep(0.1)
                assert drained == {"demo-verifier-a", "demo-verifier-c"}
                assert live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["replicas"] >= 2  # c still has a call
                # a is idle: after the grace period it gets the lowest deletion cost and replicas go down by one
                await eventually(lambda: live(k8s, "v1/pods", "demo-verifier-a")["metadata"].get(
                    "annotations", {}).get("controller.kubernetes.io/pod-deletion-cost") == "-1000000",
                    what="pod a marked for deletion")
                assert "annotations" not in live(k8s, "v1/pods", "demo-verifier-c")["metadata"]
                k8s.objects["v1/pods", NS, "demo-verifier-a"].delete()  # the ReplicaSet removes it
                del inflight["demo-verifier-a"]
                inflight["demo-verifier-c"] = 0  # its last call finished
                await eventually(lambda: live(k8s, "v1/pods", "demo-verifier-c")["metadata"].get(
                    "annotations", {}).get("controller.kubernetes.io/pod-deletion-cost") == "-1000000",
                    what="pod c marked for deletion once idle")
                k8s.objects["v1/pods", NS, "demo-verifier-c"].delete()
                await eventually(lambda: live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["replicas"] == 1,
                                 what="verifier Deployment at 1")
                assert "annotations" not in live(k8s, "v1/pods", "demo-verifier-b")["metadata"]
                beating.cancel()
        finally:
            await store.purge()
            await store.redis.aclose()

    run(body())


def test_deletion_cleans_up():
    async def body():
        async with operator(SPEC) as k8s:
            await eventually(lambda: live(k8s, FLEETS, "demo").get("metadata", {}).get("finalizers"),
                             what="the finalizer")
            await eventually(lambda: "demo-internal-token" in names(k8s, "v1/secrets"), what="the children")
            async with k8s.delete(f"/apis/{FLEETS.rsplit('/', 1)[0]}/namespaces/{NS}/specfleets/demo") as reply:
                assert reply.status == 200
            await eventually(lambda: live(k8s, FLEETS, "demo") is None, what="the SpecFleet gone")
            for resource in ("apps/v1/deployments", "v1/services", "v1/configmaps", "v1/secrets"):
                assert names(k8s, resource) == set(), resource

    run(body())


def test_kubernetes_actuator_counts_what_the_deployment_asks_for():
    """During a rollout the old ReplicaSet's surplus pod is not a replica to drain; missing pods are pending."""
    from specfleet_operator.actuators import KubernetesActuator
    from specfleet_operator.kube import KubeClient
    from specfleet_operator.manifests import fleet_manifests
    from specfleet_operator.spec import FleetSpec

    async def body():
        async with KubernetesEmulator() as k8s, Server(k8s):
            declare_resources(k8s)
            fleet = FleetSpec.from_dict("demo", {"verifier": {"replicas": 3}})
            deployment = next(o for o in fleet_manifests(fleet) if o["kind"] == "Deployment"
                              and o["metadata"]["name"] == "demo-verifier")
            k8s.objects[DEPLOYMENTS, NS, "demo-verifier"] = deployment
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            for name, created in (("old", "2026-01-01T00:00:00Z"), ("n1", "2026-02-01T00:00:00Z"),
                                  ("n2", "2026-02-01T00:00:01Z"), ("n3", "2026-02-01T00:00:02Z")):
                k8s.objects["v1/pods", NS, name] = {"metadata": {"name": name, "labels": labels,
                                                                 "creationTimestamp": created}}
            async with KubeClient(str(k8s.url)) as client:
                actuator = KubernetesActuator(client, NS, fleet)
                await actuator.refresh()
                assert await actuator.replicas("verifier") == ["n1", "n2", "n3"]
                await actuator.start_replica("verifier")
                await actuator.start_replica("verifier")
                assert live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["replicas"] == 5
                assert await actuator.replicas("verifier") == ["n1", "n2", "n3", "old",
                                                              "demo-verifier-pending-0"]
                await actuator.drain_and_stop("verifier", "demo-verifier-pending-0")
                await actuator.drain_and_stop("verifier", "old")
                assert live(k8s, "v1/pods", "old")["metadata"]["annotations"] == {
                    "controller.kubernetes.io/pod-deletion-cost": "-1000000"}
                assert live(k8s, DEPLOYMENTS, "demo-verifier")["spec"]["replicas"] == 3

    run(body())


def test_a_restarted_operator_resumes_its_counts_and_sees_a_scale_made_meanwhile():
    earlier = {"roles": {"verifier": {"desired": 3, "ready": 3, "requested": 2},
                         "router": {"desired": 2, "ready": 2, "requested": 1}}}
    spec = {**SPEC, "verifier": {"replicas": 5}}  # `kubectl scale --replicas=5` while no operator ran

    async def body():
        async with operator(spec, status=earlier) as k8s:
            await eventually(lambda: (live(k8s, DEPLOYMENTS, "demo-verifier") or {}).get("spec", {}).get(
                "replicas") == 5, what="the verifier scaled to the new request")
            roles = await eventually(lambda: (s := live(k8s, FLEETS, "demo")["status"]["roles"])["verifier"][
                "requested"] == 5 and s, what="status roles")
            assert roles["router"]["desired"] == 2  # the autoscaled count survives the restart
            assert live(k8s, DEPLOYMENTS, "demo-router")["spec"]["replicas"] == 2

    run(body())
