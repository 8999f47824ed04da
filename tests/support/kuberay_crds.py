"""KubeRay's RayJob and RayService schemas, trimmed for the manifest tests (tests/data/kuberay/).

The CRDs' OpenAPI schemas are open: the API server prunes a field it does not know, silently, so a
misspelt ``shutdownAfterJobFinish`` would be accepted and ignored. The trimmed copies close every
object that lists its properties (``additionalProperties: false``), drop descriptions, and leave the
pod templates to kubernetes-validate (the official Kubernetes schemas, in the test's own validation).

    python -m tests.support.kuberay_crds KUBERAY_CHECKOUT v1.7.0   # rewrites tests/data/kuberay/*.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).resolve().parent.parent / "data" / "kuberay"
CRDS = {"RayJob": "rayjobs", "RayService": "rayservices"}
#: fields whose schema is a Kubernetes core type, validated with the official schemas instead
CORE_TYPES = {"template", "submitterPodTemplate", "headService", "serveService"}


def trim(schema: Any) -> Any:
    if isinstance(schema, list):
        return [trim(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: trim(v) for k, v in schema.items() if k != "description"}
    props = out.get("properties")
    if props is not None:
        for name in CORE_TYPES & set(props):
            props[name] = {"type": "object"}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def schema_path(kind: str) -> Path:
    return DATA / f"{CRDS[kind]}.json"


def main(checkout: str, tag: str) -> None:
    for kind, plural in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(
            ["git", "-C", checkout, "show", f"{tag}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        crd = yaml.safe_load(text)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = trim(v1["schema"]["openAPIV3Schema"])
        schema["$comment"] = f"KubeRay {tag} {path}, trimmed by tests/support/kuberay_crds.py"
        schema_path(kind).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
