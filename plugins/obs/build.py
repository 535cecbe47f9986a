"""Build the OBS plugin (CMake) and install it where OBS looks for per-user plugins."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent  # holds CMakeLists.txt
PLUGIN_NAME = "livediffusion"

#: what each system needs before `livediffusion obs install` can build
BUILD_DEPENDENCIES = {
    "linux": "Debian/Ubuntu: sudo apt-get install cmake pkg-config build-essential libobs-dev "
             "libzmq3-dev",
    "darwin": "brew install cmake pkg-config zeromq, and an OBS source tree or obs-deps for "
              "libobs (set CMAKE_PREFIX_PATH to it)",
    "win32": "CMake, Visual Studio 2022, vcpkg install zeromq:x64-windows, and an OBS build "
             "for libobs (pass -DCMAKE_PREFIX_PATH=...)",
}


class BuildError(RuntimeError):
    """The plugin could not be built; the message says what is missing."""


def _platform() -> str:
    return "win32" if sys.platform.startswith("win") else \
        "darwin" if sys.platform == "darwin" else "linux"


def user_plugin_dir() -> Path:
    """The per-user plugin folder OBS searches (the plugin goes into PLUGIN_NAME below it)."""
    platform = _platform()
    if platform == "win32":  # the machine-wide plugin folder of recent OBS releases
        return (Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "obs-studio" /
                "plugins" / PLUGIN_NAME)
    if platform == "darwin":
        return (Path.home() / "Library" / "Application Support" / "obs-studio" / "plugins")
    return Path.home() / ".config" / "obs-studio" / "plugins" / PLUGIN_NAME


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        hint = BUILD_DEPENDENCIES[_platform()]
        raise BuildError(f"{what} failed ({hint}):\n{tail}")


def build(build_dir: str | Path, *, plugin: bool = True, tests: bool = True,
          config: str = "Release", cmake_args: tuple[str, ...] = ()) -> Path:
    """Configure and build into build_dir; returns it. Raises BuildError with the reason."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError(f"cmake is not installed ({BUILD_DEPENDENCIES[_platform()]}).")
    build_dir = Path(build_dir)
    _run([cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={config}",
          f"-DLD_BUILD_PLUGIN={'ON' if plugin else 'OFF'}",
          f"-DLD_BUILD_TESTS={'ON' if tests else 'OFF'}", *cmake_args], "configuring")
    _run([cmake, "--build", str(build_dir), "--config", config, "--parallel"], "building")
    return build_dir


def install(build_dir: str | Path, dest: str | Path | None = None,
            config: str = "Release") -> Path:
    """Install a built plugin into dest (default: OBS's per-user plugin folder)."""
    dest = Path(dest) if dest is not None else user_plugin_dir()
    _run([shutil.which("cmake") or "cmake", "--install", str(build_dir), "--config", config,
          "--prefix", str(dest)], "installing")
    return dest


def selftest_path(build_dir: str | Path) -> Path:
    build_dir = Path(build_dir)
    for candidate in (build_dir / "ld_selftest", build_dir / "ld_selftest.exe",
                      build_dir / "Release" / "ld_selftest.exe"):
        if candidate.exists():
            return candidate
    raise BuildError(f"ld_selftest was not built in {build_dir}.")
