"""An early, one-line answer when ``python -m pedx_ray.X`` / ``python -m tune_spaces.X`` runs on a Python
that lacks the project's dependencies (typically a cluster node whose PATH python is not the venv).

Only top-level modules are looked up (``importlib.util.find_spec`` imports nothing), so the check costs
microseconds; library imports are left alone and fail as Python normally does."""

from __future__ import annotations

import importlib.util
import sys

# Import name → what to install (pyproject.toml's dependencies the training entry points need).
REQUIRED_MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "ray": "ray[train,tune,serve]",
    "numpy": "numpy",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "yaml": "pyyaml",
    "cv2": "opencv-python-headless",
    "albumentations": "albumentations",
}
EXIT_MISSING = 2


def missing_modules(modules=REQUIRED_MODULES) -> list[str]:
    """The install names of the modules this Python cannot import."""
    return [package for name, package in modules.items() if importlib.util.find_spec(name) is None]


def missing_message(missing: list[str]) -> str:
    return (
        f"error: {sys.executable} lacks {', '.join(missing)}: run with the project's Python "
        "(.venv/bin/python; on a Ray cluster start every node from the venv or set py_executable "
        "in configs/runtime_env.yaml) or install the project there (pip install -e .)"
    )


def exit_if_run_without_dependencies() -> None:
    """Called from the packages' ``__init__``: exit with one line (code 2) when a module of the package is
    being run with ``python -m`` and a dependency is missing. While ``-m`` locates the module (parent
    packages included) ``sys.argv[0]`` is ``"-m"``, so plain imports are never affected."""
    if sys.argv[:1] != ["-m"]:
        return
    missing = missing_modules()
    if missing:
        print(missing_message(missing), file=sys.stderr)
        raise SystemExit(EXIT_MISSING)
