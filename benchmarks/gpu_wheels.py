"""The wheels the GPU machine lacks, fetched here and carried there (it reaches no package registry).

    python -m benchmarks.gpu_wheels            # download them into .whl/ (git-ignored), ~50 MB
    python -m benchmarks.gpu_wheels --check    # the dry run of the Ray sections with only the device's
                                               # packages and .whl importable: is the list complete?

The lent H200 machine runs Python 3.12 with PyTorch, transformers and the packages in
``DEVICE_PACKAGES`` (its image's list), but not Ray, FastAPI or pydantic, which the
ray_data and serve sections need. ``CARRY`` names what they need beyond that image, at the versions
installed here (the versions the project is tested with); ``--check`` found the list. Two wheels lose
what never runs there (``STRIP``): Ray its Java jars (31 of its 79 MB), botocore every service model
but S3's (14 of its 16 MB; ``pipeline.storage`` imports botocore even for local files), so everything
fits the 64 MiB that travels with the working tree.
``benchmarks/gpu_suite.sh`` installs them there with ``pip --no-index --target``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_BYTES = 62 * 2**20  # of the 64 MiB a device call carries; the repository is ~1 MiB

#: Python packages of the GPU machine's image: these are not carried.
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()

#: What the Ray sections import beyond the image (ray[data,serve] minus what they never load here).
CARRY = [
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",  # in the image, but pydantic needs >= 4.16 and the image's version is not known
    "opentelemetry-api",  # fastapi imports it
    "grpcio-reflection",  # Ray Serve imports it; its generated code checks grpcio's version, so
    "grpcio",  # grpcio and protobuf come at the versions tested here rather than the image's
    "protobuf",
    "botocore",  # pipeline.storage hooks its S3 retries at import
    "jmespath",
    "watchfiles",  # `serve run` imports it
]
#: Parts of wheels that never run on the GPU machine: Java workers, AWS service models but S3's.
STRIP: dict[str, Callable[[str], bool]] = {
    "ray": lambda name: name.startswith("ray/jars/"),
    "botocore": lambda name: (
        name.startswith("botocore/data/") and name.count("/") >= 3 and name.split("/")[2] not in ("s3", "sts")
    ),
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def download(names: list[str], dest: Path) -> list[Path]:
    """Each package at this environment's version, as a binary wheel for CPython 3.12 on x86-64."""
    dest.mkdir(exist_ok=True)
    pins = [f"{n}=={md.version(n)}" for n in names]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
    ]
    cmd += [
        "--implementation",
        "cp",
        *(a for p in PLATFORMS for a in ("--platform", p)),
        "-d",
        str(dest),
        *pins,
    ]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def strip(wheel: Path, drop: Callable[[str], bool]) -> None:
    """Rewrite ``wheel`` without the files ``drop`` names, its RECORD kept consistent."""
    with zipfile.ZipFile(wheel) as src:
        if not any(drop(n) for n in src.namelist()):
            return
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if drop(info.filename):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in csv.reader(io.StringIO(data.decode())) if not drop(r[0])]
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerows(rows)
                    data = buf.getvalue().encode()
                dst.writestr(info, data)
    os.replace(tmp, wheel)


def fetch() -> int:
    wheels = download(CARRY, WHEELS)
    for w in wheels:
        name = _canonical(w.name.split("-")[0])
        if name in STRIP:
            strip(w, STRIP[name])
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {WHEELS}")
    if total > LIMIT_BYTES:
        print(
            f"more than {LIMIT_BYTES / 2**20:.0f} MiB: the repository would not fit beside them",
            file=sys.stderr,
        )
        return 1
    return 0


SITECUSTOMIZE = '''"""Written by benchmarks.gpu_wheels --check: only the GPU machine's packages can be imported."""
import sys

BLOCKED = set({blocked!r})


class _DeviceImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, _DeviceImage())
'''


def blocked_modules() -> list[str]:
    """Top-level modules installed here whose every distribution is neither on the device nor carried."""
    allowed = {_canonical(n) for n in [*DEVICE_PACKAGES, *CARRY, "janus-pipeline"]}
    return sorted(
        module
        for module, dists in md.packages_distributions().items()
        if not any(_canonical(d) in allowed for d in dists)
    )


def check() -> int:
    """The dry run of the Ray sections, in processes (Ray's workers too) that see only the device's packages."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=blocked_modules()))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
        out = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_suite",
            "--dry-run",
            "--only",
            "ray_data,serve",
            "--out",
            str(out),
        ]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        summary = json.loads((out / "summary.json").read_text())
        bad = {k: v["status"] for k, v in summary["sections"].items() if v["status"] != "ok"}
        for name in bad:
            data = json.loads((out / f"{name}.json").read_text())
            errors = [f"{i['name']}: {i['error']}" for i in data["items"] if i["status"] == "failed"]
            for error in [*errors, *([data["traceback"]] if "traceback" in data else [])]:
                print(f"{name}: {error}", file=sys.stderr)
    print(
        "complete: the Ray sections ran with only the device's packages" if not bad else f"incomplete: {bad}"
    )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--check", action="store_true", help="replay the Ray sections with the device's packages only"
    )
    args = ap.parse_args(argv)
    return check() if args.check else fetch()


if __name__ == "__main__":
    raise SystemExit(main())
