"""Pack what a lent GPU machine lacks into ``.gpu/`` (git-ignored), for ``scripts/gpu-run`` there.

    python -m bench.gpu_pack            # then the device tool: command scripts/gpu-run, carry [".gpu"]

The device machine (docs/benchmarks.md, "On a GPU") has Python 3.12 with torch, torchvision, timm,
numpy, pillow and huggingface_hub, no network, and none of prelabel's other dependencies; nor does
``../shared/data`` travel with the checkout. This downloads those wheels for CPython 3.12 on x86-64
Linux, without their dependencies (``WHEELS`` is the closure that ``bench.throughput`` and
``bench.toy_clip`` import, less ``ON_THE_MACHINE``; tests/test_bench.py checks it stays so), and
copies the shared photos. ``--python 3.11 --dest .gpu-here`` packs the same for this machine's
Python, for a dry run of ``scripts/gpu-run`` on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from bench.photos import DATA, REPO

#: Distributions the machine's image holds (the device tool's KINDS.md, read 2026-11-17), as far
#: as prelabel's imports reach; the machine's own versions are used.
ON_THE_MACHINE = frozenset({
    "anyio", "attrs", "certifi", "charset-normalizer", "click", "cuda-bindings", "cuda-pathfinder", "filelock",
    "h11", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2", "lxml", "markupsafe", "mpmath", "numpy",
    "opencv-python-headless", "pandas", "pillow", "prometheus-client", "pygments", "python-dateutil", "pyyaml",
    "regex", "requests", "rich", "safetensors", "setuptools", "six", "sympy", "timm", "torch", "torchvision",
    "tqdm", "triton", "typing-extensions", "urllib3", "werkzeug", "wrapt",
})  # fmt: skip

#: What it lacks, pinned to the versions the tests run with.
WHEELS = (
    "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5",
    "rq==3.0.0", "redis==8.2.0", "croniter==7.0.0",
    "Flask==3.1.3", "blinker==1.9.0", "itsdangerous==2.2.0",
    "label-studio-sdk==2.1.2", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "Faker==40.63.0", "PyJWT==2.13.0", "appdirs==1.4.4", "boto3==1.44.18",
    "botocore==1.44.18", "s3transfer==0.19.3", "jmespath==1.1.0", "ijson==3.6.0", "jsf==0.11.2", "rstr==3.2.2",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
    "rfc3339-validator==0.1.4", "nltk==3.10.4", "smart_open==9.0.4", "ujson==6.1.0", "xmljson==0.2.1",
    "defusedxml==0.7.1", "httpx2==2.17.0", "httpcore2==2.17.0", "truststore==0.10.5",
)  # fmt: skip

#: Imported here only because they are installed (PyJWT's and jsonschema's optional extras): the
#: dry run of scripts/gpu-run ran without them.
OPTIONAL = frozenset({"cffi", "cryptography", "jsonpointer"})

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")  # fmt: skip


def normalised(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return name.split("==")[0].lower().replace("_", "-").replace(".", "-")


def pack(dest: Path, python: str) -> None:
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(wheels), "--python-version", python, "--implementation", "cp", *platforms,
                    *WHEELS], check=True)  # fmt: skip
    for folder in ("voc-samples", "imagenet-samples"):  # bench/photos.py reads PRELABEL_SHARED_DATA
        shutil.rmtree(dest / "data" / folder, ignore_errors=True)
        shutil.copytree(DATA / folder, dest / "data" / folder)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.0f} MiB (the working tree and what is carried travel within 64 MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".gpu")
    parser.add_argument("--python", default="3.12", help="the Python version the wheels are for")
    args = parser.parse_args(argv)
    pack(args.dest.resolve(), args.python)


if __name__ == "__main__":
    main()
