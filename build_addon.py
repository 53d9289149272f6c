"""Build the installable Blender extension: dist/facerecon_blender-<version>.zip.

    python build_addon.py                # add-on + vendored shared_protocol + pyzmq wheels
    python build_addon.py --no-wheels    # offline: no download; Blender then needs pyzmq already

The zip holds blender_addon/ at its root (blender_manifest.toml first), shared_protocol/ vendored
as a subpackage, and pyzmq wheels for Blender's Python on Linux x86_64, Windows x64 and macOS
(universal2: arm64 and x86_64): cp311 for Blender 4.2-5.0, cp312-abi3 for Blender 5.1+ (Python 3.13).
The wheels are fetched from the package registry at build time and listed in the manifest.
Validation: `blender --command extension validate` if a Blender binary is on PATH, else Blender's
own validator script from the `bpy` package if installed, else this script's check of the fields.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON = ROOT / "blender_addon"
PYZMQ = "pyzmq==27.3.0"
WHEEL_TARGETS = [   # (python version, abi, platform tags)
    ("3.11", "cp311", ["manylinux_2_28_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64"]),
    ("3.11", "cp311", ["win_amd64"]),
    ("3.11", "cp311", ["macosx_10_15_universal2"]),
    ("3.12", "abi3", ["manylinux_2_28_x86_64", "manylinux_2_26_x86_64", "manylinux_2_17_x86_64"]),
    ("3.12", "abi3", ["win_amd64"]),
    ("3.12", "abi3", ["macosx_10_15_universal2"]),
]
PLATFORMS = ["linux-x64", "windows-x64", "macos-arm64", "macos-x64"]
REQUIRED_FIELDS = {"schema_version": str, "id": str, "version": str, "name": str, "tagline": str,
                   "maintainer": str, "type": str, "license": list, "blender_version_min": str}


def download_wheels(cache: Path) -> list[Path]:
    """pip-download each target's pyzmq wheel into cache (reused when already there)."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for python, abi, platforms in WHEEL_TARGETS:
        before = set(cache.glob("*.whl"))
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(cache), "--python-version", python, "--implementation", "cp", "--abi", abi]
        for platform in platforms:
            command += ["--platform", platform]
        subprocess.run(command + [PYZMQ], check=True)
        version = PYZMQ.split("==")[1]
        tag = f"cp{python.replace('.', '')}-{abi}"
        matches = [w for w in cache.glob(f"pyzmq-{version}-{tag}-*.whl")
                   if any(p in w.name for p in platforms)]
        if len(matches) != 1:
            raise SystemExit(f"expected one pyzmq wheel for {tag} {platforms}, found {matches or 'none'} "
                             f"(new: {sorted(set(cache.glob('*.whl')) - before)})")
        wheels.append(matches[0])
    return wheels


def manifest_text(wheels: list[str]) -> str:
    """The add-on's manifest with the wheel list (and, with wheels, the platforms) filled in."""
    text = (ADDON / "blender_manifest.toml").read_text()
    if wheels:
        listed = ",\n".join(f'  "./wheels/{name}"' for name in wheels)
        platforms = ", ".join(f'"{p}"' for p in PLATFORMS)
        text = text.replace("\n[permissions]",
                            f"\nplatforms = [{platforms}]\nwheels = [\n{listed},\n]\n\n[permissions]", 1)
    return text


def check_manifest(manifest: dict) -> list[str]:
    """The required fields, their types, and the versions this project promises."""
    problems = [f"'{key}' missing or not a {kind.__name__}" for key, kind in REQUIRED_FIELDS.items()
                if not isinstance(manifest.get(key), kind)]
    if manifest.get("type") != "add-on":
        problems.append("type must be 'add-on'")
    if manifest.get("blender_version_min") != "4.2.0":
        problems.append("blender_version_min must be 4.2.0")
    permissions = manifest.get("permissions", {})
    for permission in ("network", "files"):
        if not isinstance(permissions.get(permission), str) or not permissions[permission]:
            problems.append(f"permission '{permission}' needs a reason")
    return problems


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def build(output: Path, with_wheels: bool, wheel_cache: Path) -> Path:
    manifest = tomllib.loads((ADDON / "blender_manifest.toml").read_text())
    if manifest["version"] != project_version():
        raise SystemExit(f"blender_manifest.toml version {manifest['version']} differs from "
                         f"pyproject.toml {project_version()}")
    wheels = download_wheels(wheel_cache) if with_wheels else []
    output.mkdir(parents=True, exist_ok=True)
    archive = output / f"facerecon_blender-{manifest['version']}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("blender_manifest.toml", manifest_text([w.name for w in wheels]))
        for path in sorted(ADDON.rglob("*.py")):
            if "__pycache__" not in path.parts:
                zf.write(path, path.relative_to(ADDON).as_posix())
        for path in sorted((ROOT / "shared_protocol").rglob("*.py")):
            if "__pycache__" not in path.parts:
                zf.write(path, path.relative_to(ROOT).as_posix())
        for wheel in wheels:
            zf.write(wheel, f"wheels/{wheel.name}")
    return archive


def validate(archive: Path) -> str:
    """Validate with Blender's own tool where available; returns which validator ran."""
    with zipfile.ZipFile(archive) as zf:
        problems = check_manifest(tomllib.loads(zf.read("blender_manifest.toml").decode()))
    if problems:
        raise SystemExit("manifest problems:\n  " + "\n  ".join(problems))
    blender = shutil.which("blender")
    if blender:
        subprocess.run([blender, "--background", "--factory-startup", "--command", "extension", "validate",
                        str(archive)], check=True)
        return "blender --command extension validate"
    try:
        import importlib.util
        spec = importlib.util.find_spec("bpy")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        scripts = sorted(Path(spec.origin).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if scripts:
            with tempfile.TemporaryDirectory() as scratch:    # the script may write caches beside it
                subprocess.run([sys.executable, str(scripts[-1]), "validate", str(archive)], check=True,
                               cwd=scratch)
            return f"Blender's validator ({scripts[-1].relative_to(Path(spec.origin).parents[1])})"
    return "the project's manifest check (no Blender found)"


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the FaceRecon Blender extension zip.")
    parser.add_argument("--no-wheels", action="store_true", help="do not download pyzmq wheels (offline)")
    parser.add_argument("--output", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    parser.add_argument("--wheel-cache", type=Path, default=ROOT / "dist" / "wheel-cache")
    args = parser.parse_args()
    archive = build(args.output, not args.no_wheels, args.wheel_cache)
    validator = validate(archive)
    print(f"built {archive} ({archive.stat().st_size / 2**20:.1f} MiB); validated by {validator}")


if __name__ == "__main__":
    main()
