"""Build the container image `localhost/tabserve:latest` (`make image`), with no container registry involved.

1. Base: a minimal Debian root filesystem made by `mmdebstrap` from Debian's packages (the Python the project
   needs, CA certificates, and the native libraries the model backends load at run time), imported with
   `podman import` as BASE_IMAGE. Rebuilt only when missing or when its package list changed (`--refresh-base`
   forces it: security updates).
2. Wheels: `pip wheel` of the project and all its dependencies, built on the host into build/image/wheels.
3. Image: `podman build` of the Containerfile with the network off, so the wheels are installed offline.

mmdebstrap, podman, runc and catatonit are installed from Debian's packages when missing (tools/debian.py); podman runs
with the project's own container/containers.conf (`podman_env()`), never the system's configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tools.debian import ensure_command

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "container" / "containers.conf"
CONTAINERFILE = ROOT / "Containerfile"
BUILD_DIR = ROOT / "build" / "image"
IMAGE = "localhost/tabserve:latest"
BASE_IMAGE = "localhost/tabserve-base:bookworm"
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What runs in the image besides Debian's essential set: python3 (Debian 12's is 3.11, within requires-python;
# `check_python` proves it), libgomp1 (LightGBM's OpenMP runtime, which its wheel does not bundle), libstdc++6
# (LightGBM's and grpcio's C++ runtime), ca-certificates (HTTPS to an MLflow server or artifact store).
PACKAGES = ("python3", "libgomp1", "libstdc++6", "ca-certificates")
# Documentation and translations are of no use in a server image (copyright files are kept).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
BASE_LABEL = "tabserve.base.packages"
COMMAND_TIMEOUT_SECONDS = 1800


def podman_env() -> dict[str, str]:
    """Our environment with CONTAINERS_CONF pointing at the project's containers.conf (runc, explicit ulimits)."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman() -> str:
    """The podman command, with the runtime the project's containers.conf names and the init of a pod's infra
    container (a podman Recommends that --no-install-recommends leaves out), each installed when missing."""
    ensure_command("runc", "runc")
    ensure_command("catatonit", "catatonit")
    return ensure_command("podman", "podman")


def run(args: Sequence[str], *, capture: bool = False) -> str:
    """Run a build step under the project's podman settings; its output goes to ours unless `capture`."""
    print("+", " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(
        list(args), check=True, env=podman_env(), text=True, timeout=COMMAND_TIMEOUT_SECONDS,
        stdout=subprocess.PIPE if capture else None,
    )
    return done.stdout or ""


def base_fingerprint() -> str:
    """Identifies what the base holds: rebuilt when a package, mirror or exclusion changes."""
    return hashlib.sha256(json.dumps([SUITE, MIRRORS, PACKAGES, DPKG_EXCLUDES]).encode()).hexdigest()[:16]


def base_is_current(podman_cmd: str) -> bool:
    found = subprocess.run(
        [podman_cmd, "image", "inspect", "--format", f'{{{{index .Labels "{BASE_LABEL}"}}}}', BASE_IMAGE],
        env=podman_env(), capture_output=True, text=True, check=False,
    )
    return found.returncode == 0 and found.stdout.strip() == base_fingerprint()


def build_base(podman_cmd: str) -> None:
    """mmdebstrap a root filesystem tarball and import it as BASE_IMAGE."""
    mmdebstrap = ensure_command("mmdebstrap", "mmdebstrap")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tarball = BUILD_DIR / "base.tar"
    run([
        mmdebstrap, "--variant=essential", f"--include={','.join(PACKAGES)}",
        *(f"--dpkgopt=path-exclude={path}" for path in DPKG_EXCLUDES),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        # apt's lists and cache are only needed to build; leave none in the image
        "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*",
        SUITE, str(tarball), *MIRRORS,
    ])
    run([
        podman_cmd, "import", "--change", f"LABEL {BASE_LABEL}={base_fingerprint()}",
        "--change", 'CMD ["/usr/bin/python3"]', str(tarball), BASE_IMAGE,
    ])
    tarball.unlink()


def check_python(podman_cmd: str) -> None:
    """The base's Python satisfies requires-python and has the host's minor version (the wheels are the host's)."""
    from packaging.specifiers import SpecifierSet

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    version = run(
        [podman_cmd, "run", "--rm", "--network", "none", BASE_IMAGE, "python3", "-c",
         "import sys; print('%d.%d.%d' % sys.version_info[:3])"], capture=True,
    ).strip()
    host = "{}.{}".format(*sys.version_info[:2])
    if version not in SpecifierSet(requires) or not version.startswith(host + "."):
        raise SystemExit(f"the base's Python {version} must satisfy {requires} and be {host}.x like the host's")


def build_wheels() -> None:
    """The project and every dependency as wheels (pip's own too: it installs them in the image, then leaves)."""
    wheels = BUILD_DIR / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT), "pip"])


def wheel_digests(wheels: Path) -> tuple[str, str]:
    """(dependencies, project) digests of the wheels: the dependencies' by file name (name and version), the
    project's by its members' names and CRCs (its zip timestamps change on every build, its content need not)."""
    names = sorted(w.name for w in wheels.glob("*.whl") if not w.name.startswith(("pip-", "tabserve-")))
    (project,) = wheels.glob("tabserve-*.whl")
    with zipfile.ZipFile(project) as archive:
        members = sorted((i.filename, i.CRC) for i in archive.infolist())
    return (hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16],
            hashlib.sha256(json.dumps(members).encode()).hexdigest()[:16])


def build_image(podman_cmd: str) -> None:
    dependencies, project = wheel_digests(BUILD_DIR / "wheels")
    run([
        podman_cmd, "build", "--network", "none", "--pull=never", "--build-arg", f"BASE={BASE_IMAGE}",
        "--build-arg", f"DEPENDENCIES_DIGEST={dependencies}", "--build-arg", f"PROJECT_DIGEST={project}",
        "-f", str(CONTAINERFILE), "-t", IMAGE, str(BUILD_DIR),
    ])


def image_size(podman_cmd: str) -> int:
    return int(run([podman_cmd, "image", "inspect", "--format", "{{.Size}}", IMAGE], capture=True).strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.image", description=__doc__.splitlines()[0])
    parser.add_argument("--refresh-base", action="store_true", help="rebuild the base even when it is current")
    args = parser.parse_args(argv)
    podman_cmd = podman()
    timings: dict[str, float] = {}
    started = time.monotonic()
    if args.refresh_base or not base_is_current(podman_cmd):
        build_base(podman_cmd)
        timings["base"] = time.monotonic() - started
    check_python(podman_cmd)
    for step, action in (("wheels", build_wheels), ("image", lambda: build_image(podman_cmd))):
        started = time.monotonic()
        action()
        timings[step] = time.monotonic() - started
    size = image_size(podman_cmd)
    print(json.dumps({"event": "built", "image": IMAGE, "size_bytes": size,
                      **{f"{step}_seconds": round(seconds, 1) for step, seconds in timings.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
