"""KubeRay manifests made from the job and Serve configs (``janus-pipeline deploy rayjob|rayservice``),
so that a cluster's GPU counts, autoscaling bounds and memory cannot drift from what the job asks for.

KubeRay's conventions (ray-operator/config/samples, v1.7): one image for head and workers; a CPU-only
head (``num-gpus: "0"``; ``num-cpus: "0"`` too, so that no task or actor competes with the driver);
GPU worker groups with ``nvidia.com/gpu`` in both requests and limits and requests equal to limits;
the in-tree autoscaler between ``minReplicas`` and ``maxReplicas``. A RayJob deletes its cluster after
the job (``shutdownAfterJobFinishes`` + TTL), retries on a new cluster (``backoffLimit``: a retry resumes
from the committed shards) and fails when it cannot start running in time
(``preRunningDeadlineSeconds``). The job config comes from a ConfigMap; S3 credentials from a Secret or
the pod's role (IRSA), never inline; the hub token, when the model comes from the hub, from a Secret.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from .config import JobConfig
from .model_ref import janus_pro_size

CONFIG_DIR = "/home/ray/janus"  # where the job's ConfigMap is mounted in the head pod
CACHE_DIR = "/home/ray/cache"  # model downloads (hub cache, s3:// copies), one volume per pod
#: bf16 bytes of the official checkpoints (their tensor shapes: tests/data/janus-pro-*-tensors.json)
WEIGHT_BYTES = {"1b": 4_178_595_094, "7b": 14_840_868_118}
ACTOR_OVERHEAD_GIB = 8  # a model process besides its weights: torch, CUDA context, pinned buffers
OBJECT_STORE_GIB = {"job": 8, "serve": 2}  # per worker pod: Ray Data's blocks in flight; Serve's messages
TASK_CPUS = 2  # per worker pod, beside the model actors: read, re-cut and write tasks
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
SERVE_PORT = 8000
#: storage_options keys that would put a credential into the ConfigMap
SECRET_KEYS = re.compile(
    r"(?i)^(key|secret|token|password|aws_access_key_id|aws_secret_access_key|aws_session_token)$"
)
DEFAULTS = {"ttl_s": 600, "backoff_limit": 2, "pre_running_deadline_s": 1800}


class DeployError(ValueError):
    """A config that cannot be deployed as asked; one line that says what to change."""


@dataclass(frozen=True)
class ClusterOptions:
    """What the configs do not say: the image, names, and how GPUs are packed into pods."""

    image: str
    name: str
    namespace: str | None = None
    gpus_per_pod: int = 1
    head_cpus: int = 4
    head_memory_gib: int = 16
    worker_memory_gib: int | None = None  # None: from the model's weights
    service_account: str | None = None  # one with an IAM role (IRSA) for S3
    s3_secret: str = "janus-s3"  # optional: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
    hf_secret: str = "janus-hf-token"  # optional: key "token"
    ray_token_secret: str = "janus-ray-token"  # Ray's token authentication: key "auth_token"
    api_keys_secret: str = "janus-api-keys"  # Serve's API keys (api.keys.env), comma-separated: key "keys"


def weight_gib(model_path: str) -> float:
    """GiB of the model's bf16 weights (Janus-Pro 1B / 7B by name; other models count as small)."""
    size = janus_pro_size(model_path)
    return WEIGHT_BYTES[size] / 2**30 if size else 0.0


def check_credentials(where: str, options: Any) -> None:
    """Refuse storage options that hold a credential: it would sit in a ConfigMap in plain text."""
    if isinstance(options, dict):
        for key, value in options.items():
            if SECRET_KEYS.match(str(key)) and value:
                raise DeployError(
                    f"{where}.{key}: a credential in the config would be stored in plain text on the "
                    "cluster; remove it and give it through the Secret janus-s3 or the pod's role"
                )
            check_credentials(f"{where}.{key}", value)


def _env(model_paths: list[str], opts: ClusterOptions) -> tuple[list[dict], list[dict]]:
    """(env, envFrom) of every Ray container: caches on the volume, credentials from Secrets."""
    env = [
        {"name": "JANUS_CACHE", "value": f"{CACHE_DIR}/janus-pipeline"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
    ]
    if any("://" not in p and p.count("/") == 1 for p in model_paths):  # a hub id
        ref = {"name": opts.hf_secret, "key": "token", "optional": True}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return env, [{"secretRef": {"name": opts.s3_secret, "optional": True}}]


def _resources(cpus: float, memory_gib: int, gpus: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod(name: str, opts: ClusterOptions, env: tuple[list, list], resources: dict, **extra: Any) -> dict:
    """A Ray pod template: the Ray container first (KubeRay's rule), the cache and /dev/shm volumes."""
    mounts = [{"name": "cache", "mountPath": CACHE_DIR}, {"name": "shm", "mountPath": "/dev/shm"}]
    mounts += extra.pop("mounts", [])
    container = {"name": name, "image": opts.image, "env": env[0], "envFrom": env[1], "resources": resources}
    container.update({"volumeMounts": mounts, **extra.pop("container", {})})
    volumes = [
        {"name": "cache", "emptyDir": {"sizeLimit": extra.pop("cache", "64Gi")}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        *extra.pop("volumes", []),
    ]
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes, **extra}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    return {"spec": spec}


def _head(opts: ClusterOptions, env: tuple[list, list], ports: dict[str, int], **extra: Any) -> dict:
    ports_list = [{"name": n, "containerPort": p} for n, p in ports.items()]
    template = _pod(
        "ray-head",
        opts,
        env,
        _resources(opts.head_cpus, opts.head_memory_gib),
        container={"ports": ports_list},
        **extra,
    )
    return {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
        "template": template,
    }


def _gpu_workers(
    opts: ClusterOptions,
    env,
    bounds: tuple[int, int],
    cpus: float,
    memory_gib: int,
    cache: str,
    store_gib: int,
) -> dict:
    """The GPU worker group: ``bounds`` (min, max) pods of ``opts.gpus_per_pod`` GPUs each; the object
    store set to ``store_gib`` (Ray's default, 30% of the pod's memory, would take it from the models)."""
    lo, hi = bounds
    template = _pod(
        "ray-worker",
        opts,
        env,
        _resources(cpus, memory_gib, opts.gpus_per_pod),
        cache=cache,
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    return {
        "groupName": "gpu",
        "replicas": lo,
        "minReplicas": lo,
        "maxReplicas": hi,
        "rayStartParams": {"object-store-memory": str(store_gib * 2**30)},
        "template": template,
    }


def _cluster(opts: ClusterOptions, head: dict, workers: list[dict]) -> dict:
    return {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token", "secretName": opts.ray_token_secret},
        "headGroupSpec": head,
        "workerGroupSpecs": workers,
    }


def _metadata(opts: ClusterOptions, name: str, component: str) -> dict:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/name": "janus-pipeline",
            "app.kubernetes.io/instance": opts.name,
            "app.kubernetes.io/component": component,
        },
    }
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _cache_size(weights_gib: float) -> str:
    """Room for the model's download and its copy while it is written (at least 16 GiB)."""
    return f"{max(16, math.ceil(2 * weights_gib + 4))}Gi"


def job_pods(cfg: JobConfig, opts: ClusterOptions) -> tuple[tuple[int, int], float, int]:
    """(min, max) GPU pods, CPUs and memory (GiB) per pod for the job's actor pool."""
    c = cfg.compute
    gpus_per_actor = c.gpus_per_actor if c.gpus_per_actor else 1
    actors_per_pod = opts.gpus_per_pod / gpus_per_actor
    if actors_per_pod < 1 or not float(actors_per_pod).is_integer():
        raise DeployError(
            f"compute.gpus_per_actor ({gpus_per_actor}) must divide --gpus-per-pod ({opts.gpus_per_pod})"
        )
    bounds = (math.ceil(c.min_actors / actors_per_pod), math.ceil(c.max_actors / actors_per_pod))
    cpus = math.ceil(actors_per_pod * c.cpus_per_actor) + TASK_CPUS
    need = actors_per_pod * (2 * weight_gib(cfg.model.path) + ACTOR_OVERHEAD_GIB) + OBJECT_STORE_GIB["job"]
    return bounds, cpus, opts.worker_memory_gib or math.ceil(need)


def rayjob(config_path: str, cfg: JobConfig, opts: ClusterOptions) -> list[dict]:
    """The job's ConfigMap and RayJob."""
    if cfg.ray.address:
        raise DeployError("ray.address: a RayJob runs on its own cluster; remove it from the config")
    for section in ("model", "input", "output"):
        check_credentials(f"{section}.storage_options", getattr(cfg, section).storage_options)
    for section in ("input", "output"):
        url = getattr(cfg, section).url
        if "://" not in url or url.startswith("file://"):
            raise DeployError(
                f"{section}.url: {url!r} is a path on one pod's disk (the output's is lost with the cluster); "
                "use object storage such as s3://bucket/prefix"
            )
    bounds, cpus, memory = job_pods(cfg, opts)
    env = _env([cfg.model.path], opts)
    config_map = f"{opts.name}-config"
    mount = {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True}
    head = _head(
        opts,
        env,
        HEAD_PORTS,
        cache="4Gi",  # the driver reads the model's config files, never its weights
        mounts=[mount],
        volumes=[{"name": "job-config", "configMap": {"name": config_map}}],
    )
    cache = _cache_size(weight_gib(cfg.model.path))
    workers = [_gpu_workers(opts, env, bounds, cpus, memory, cache, OBJECT_STORE_GIB["job"])]
    gpus = (
        "" if cfg.compute.gpus_per_actor else " --set compute.gpus_per_actor=1"
    )  # never CPU actors by accident
    spec = {
        "entrypoint": f"janus-pipeline {cfg.job} --config {CONFIG_DIR}/job.yaml{gpus}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": DEFAULTS["ttl_s"],
        "backoffLimit": DEFAULTS["backoff_limit"],
        "preRunningDeadlineSeconds": DEFAULTS["pre_running_deadline_s"],
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": _cluster(opts, head, workers),
    }
    text = Path(config_path).read_text(encoding="utf-8")
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(opts, config_map, cfg.job),
            "data": {"job.yaml": text},
        },
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": _metadata(opts, opts.name, cfg.job),
            "spec": spec,
        },
    ]


def serve_needs(apps: list[tuple[str, Any]]) -> dict[str, Any]:
    """What the Serve applications' deployments ask of the cluster: GPU replicas (min, max), their CPUs
    each, the largest model's weights, and the ingress replicas' CPUs (min, max)."""
    gpu, ingress = [0, 0], [0.0, 0.0]
    cpus_per_gpu_replica, weights, gpus_per_replica = 0.0, 0.0, 1.0
    for _, args in apps:
        for name in ("synthesis", "caption"):
            section = getattr(args, name)
            if section is None:
                continue
            options = section.deployment_options(name)
            actor, scale = options.get("ray_actor_options", {}), _replicas(options)
            if not actor.get("num_gpus"):
                raise DeployError(
                    f"{name}.deployment.ray_actor_options.num_gpus: set it (1) for a GPU cluster"
                )
            gpu = [gpu[i] + math.ceil(scale[i] * actor["num_gpus"]) for i in (0, 1)]
            cpus_per_gpu_replica = max(cpus_per_gpu_replica, actor.get("num_cpus", 1))
            gpus_per_replica = min(gpus_per_replica, actor["num_gpus"])
            weights = max(weights, weight_gib(section.model.path))
            check_credentials(f"{name}.model.storage_options", section.model.storage_options)
        api = args.api.deployment_options()
        cpus = api.get("ray_actor_options", {}).get("num_cpus", 1)
        ingress = [ingress[i] + _replicas(api)[i] * cpus for i in (0, 1)]
        check_credentials("api.image_storage_options", args.api.image_storage_options)
    return {
        "gpus": gpu,
        "gpus_per_replica": gpus_per_replica,
        "cpus_per_gpu_replica": cpus_per_gpu_replica,
        "weights_gib": weights,
        "ingress_cpus": ingress,
    }


def _replicas(options: dict[str, Any]) -> tuple[int, int]:
    scaling = options.get("autoscaling_config")
    if scaling:
        return scaling.get("min_replicas", 1), scaling.get("max_replicas", 1)
    n = options.get("num_replicas", 1)
    return n, n


def rayservice(serve_path: str, apps: list[tuple[str, Any]], opts: ClusterOptions) -> list[dict]:
    """The RayService: the Serve config as it is (``serveConfigV2``) on a cluster sized for it."""
    needs = serve_needs(apps)
    env = _env(
        [a.model.path for _, args in apps for a in (args.synthesis, args.caption) if a is not None], opts
    )
    for _, args in apps:
        if args.api.keys.file:
            raise DeployError(
                "api.keys.file is a path on the replica's machine: for a RayService use api.keys.env and "
                f"the Secret {opts.api_keys_secret} (key 'keys', comma-separated)"
            )
    for name in sorted({args.api.keys.env for _, args in apps}):
        # optional: without the Secret the API is open (as with no keys locally), and says so at start
        ref = {"name": opts.api_keys_secret, "key": "keys", "optional": True}
        env[0].append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    per_pod = opts.gpus_per_pod
    bounds = (math.ceil(needs["gpus"][0] / per_pod), math.ceil(needs["gpus"][1] / per_pod))
    replicas = math.ceil(per_pod / needs["gpus_per_replica"])  # the most that can share a pod
    cpus = math.ceil(replicas * needs["cpus_per_gpu_replica"]) + 1
    store = OBJECT_STORE_GIB["serve"]
    memory = opts.worker_memory_gib or math.ceil(
        replicas * (2 * needs["weights_gib"] + ACTOR_OVERHEAD_GIB) + store
    )
    workers = [_gpu_workers(opts, env, bounds, cpus, memory, _cache_size(needs["weights_gib"]), store)]
    cpu_pod = 8
    lo, hi = (math.ceil(n / cpu_pod) for n in needs["ingress_cpus"])
    ingress = _pod("ray-worker", opts, env, _resources(cpu_pod, 2 * cpu_pod), cache="1Gi")
    workers.append(
        {
            "groupName": "cpu",
            "replicas": lo,
            "minReplicas": lo,
            "maxReplicas": hi,
            "rayStartParams": {},
            "template": ingress,
        }
    )
    head = _head(opts, env, {**HEAD_PORTS, "serve": SERVE_PORT}, cache="4Gi")
    spec = {
        "serveConfigV2": yaml.safe_dump(
            yaml.safe_load(Path(serve_path).read_text(encoding="utf-8")), sort_keys=False
        ),
        "rayClusterConfig": _cluster(opts, head, workers),
    }
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": _metadata(opts, opts.name, "serve"),
            "spec": spec,
        }
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job config, the Serve config) as literal blocks, as people write them;
    repeated values written out, not as YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(docs: list[dict], command: list[str]) -> str:
    """The manifests as one YAML stream, headed by the command that made them."""
    head = (
        f"# Generated by: {' '.join(command)}\n"
        "# Do not edit: change the config and run the command again (tests/test_kuberay.py checks both agree).\n"
    )
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)
    return head + body


def default_name(config_path: str) -> str:
    """``configs/prod_synthesize_7b_s3.yaml`` -> ``janus-prod-synthesize-7b-s3`` (a Kubernetes name)."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(os.fspath(config_path)).stem.lower()).strip("-")
    return f"janus-{stem}"[:40].rstrip("-")
