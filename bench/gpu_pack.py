"""Pack what a lent GPU machine lacks into ``.gpu/`` (git-ignored), for ``scripts/gpu-run`` there.

    python -m bench.gpu_pack            # then the device tool: command scripts/gpu-run, carry [".gpu"]

The device machine (docs/benchmarks.md, "On a GPU") has Python 3.12 with torch, torchvision, timm,
numpy, pillow and huggingface_hub, no network, and none of prelabel's other dependencies; nor does
``../shared/data`` travel with the checkout. This downloads those wheels for CPython 3.12 on x86-64
Linux, without their dependencies (``WHEELS`` is the closure that ``bench.throughput`` and
``bench.toy_clip`` import, less ``ON_THE_MACHINE``; tests/test_bench.py checks it stays so), and
copies the shared VOC photos; it fails when the working tree and the pack would not fit in one
call. ``--python 3.11 --dest .gpu-here`` packs the same for this machine's Python, for a dry run of
``scripts/gpu-run`` on the CPU.
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
    "tqdm", "triton", "urllib3", "wrapt",
})  # fmt: skip

#: What it lacks, pinned to the versions the tests run with. The machine has typing-extensions and
#: werkzeug, of versions not recorded, perhaps older than pydantic's (4.16) and Flask's (3.1)
#: floors: ours come first on PYTHONPATH.
WHEELS = (
    "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5",
    "rq==3.0.0", "redis==8.2.0", "croniter==7.0.0",
    "Flask==3.1.3", "blinker==1.9.0", "itsdangerous==2.2.0", "Werkzeug==3.1.9", "typing_extensions==4.16.0",
    "label-studio-sdk==2.1.2", "pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "Faker==40.63.0", "PyJWT==2.13.0", "appdirs==1.4.4", "ijson==3.6.0", "jsf==0.11.2",
    "rstr==3.2.2", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
    "rpds-py==2026.9.1", "rfc3339-validator==0.1.4", "nltk==3.10.4", "smart_open==9.0.4", "ujson==6.1.0",
    "xmljson==0.2.1", "defusedxml==0.7.1", "httpx2==2.17.0", "httpcore2==2.17.0", "truststore==0.10.5",
)  # fmt: skip

#: Imported here only because they are installed (PyJWT's, jsonschema's and smart_open's optional
#: extras; boto3 and botocore alone are 18 MB): the dry run of scripts/gpu-run ran without them.
OPTIONAL = frozenset({"cffi", "cryptography", "jsonpointer", "boto3", "botocore", "s3transfer", "jmespath"})

#: What one device call may carry: the working tree (tracked and untracked files git does not
#: ignore) and the carried paths together.
CARRY_LIMIT = 64 * 2**20

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
    # The VOC samples only (bench/photos.py reads PRELABEL_SHARED_DATA; the training figures need
    # their masks): the ImageNet ones would not fit in what a call carries.
    shutil.rmtree(dest / "data", ignore_errors=True)
    shutil.copytree(DATA / "voc-samples", dest / "data" / "voc-samples")
    packed, tree = _size(dest.rglob("*")), _size(REPO / f for f in _tree_files())
    print(f"{dest}: {packed / 2**20:.1f} MiB, with the working tree's {tree / 2**20:.1f} MiB: "
          f"{(packed + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a device call carries")  # fmt: skip
    if packed + tree > CARRY_LIMIT:
        raise SystemExit("Too large for the device call: carry fewer wheels or photos (bench/gpu_pack.py).")


def _tree_files() -> list[str]:
    """The working tree as the device tool sends it: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout  # fmt: skip
    return [name for name in listed.decode().split("\0") if name]


def _size(paths) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".gpu")
    parser.add_argument("--python", default="3.12", help="the Python version the wheels are for")
    args = parser.parse_args(argv)
    pack(args.dest.resolve(), args.python)


if __name__ == "__main__":
    main()
