"""docker/Dockerfile, checked where no image can be pulled or built: its base is Ray's GPU image at the
Ray we pin, for a Python our pins cover, with the CUDA major of the pinned torch wheels; every install
uses constraints.txt; the build context holds what the install needs (the shapes model included)."""

from __future__ import annotations

import re
import sys
from fnmatch import fnmatch

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.support import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pinned for Python 3.10 in constraints.txt (a pytest dependency there)
    import tomli as tomllib

DOCKERFILE = REPO / "docker" / "Dockerfile"


def args_before_from() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    head = text[: text.index("\nFROM ")]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, re.M))


def pins(python: str) -> dict[str, list[str]]:
    """constraints.txt's pins that apply on Linux x86_64 with ``python``: name -> versions."""
    env = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
    }
    found: dict[str, list[str]] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line or line.startswith(("#", " ")):
            continue
        req = Requirement(line)
        if req.marker is None or Marker(str(req.marker)).evaluate(env):
            found.setdefault(req.name.lower(), []).append(str(req.specifier).removeprefix("=="))
    return found


def python_of(tag: str) -> str:
    match = re.fullmatch(r"py3(\d+)", tag)
    assert match, f"PYTHON_TAG must look like py312, got {tag}"
    return f"3.{match.group(1)}"


def test_the_base_image_is_rays_gpu_image_at_our_ray_python_and_cuda():
    args = args_before_from()
    assert re.search(
        r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{CUDA_TAG\}$",
        DOCKERFILE.read_text(),
        re.M,
    )
    python = python_of(args["PYTHON_TAG"])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{python}.0"), (python, requires)
    pinned = pins(python)
    assert all(len(v) == 1 for v in pinned.values()), {k: v for k, v in pinned.items() if len(v) > 1}
    assert pinned["ray"] == [args["RAY_VERSION"]]  # the image's Ray is the Ray the package pins
    for name in ("torch", "transformers", "pyarrow", "fastapi"):
        assert name in pinned, f"constraints.txt pins no {name} for Python {python}"
    # the CUDA major of the base image is that of the torch wheels' pinned runtime
    cuda = re.fullmatch(r"cu(\d+)(\d)", args["CUDA_TAG"])
    assert cuda, args["CUDA_TAG"]
    assert pinned["nvidia-cuda-runtime"][0].split(".")[0] == cuda.group(1)


def test_every_install_uses_the_constraints_after_they_are_copied():
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert installs
    for i in installs:
        assert "--constraint constraints.txt" in lines[i], lines[i]
    copied = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "constraints.txt" in line)
    assert copied < installs[0]
    assert "import ray; assert ray.__version__ == '${RAY_VERSION}'" in lines[installs[-1]]


def test_the_build_context_holds_the_package_its_data_and_the_configs():
    ignore = [
        line
        for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert ignore[0] == "*"
    copied = set(re.findall(r"^COPY --chown=ray:users (\S+) \1$", DOCKERFILE.read_text(), re.M))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied <= kept and "configs" in copied
    assert {"constraints.txt", "pyproject.toml", project["project"]["readme"]} <= kept
    checkpoint = project["tool"]["setuptools"]["package-data"]["janus.shapes"]
    files = [
        p.relative_to(REPO / "janus" / "shapes").as_posix() for p in (REPO / "janus" / "shapes").rglob("*")
    ]
    assert any(
        fnmatch(f, pattern) and f.endswith("model.safetensors") for f in files for pattern in checkpoint
    )
    assert (REPO / "configs" / "demo_synthesize.yaml").is_file()
