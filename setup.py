"""Build step pyproject.toml cannot express: ship the root-level folders inside the package.

``migrations/`` and ``pass_templates/`` stay at the repository root, where people look
for them, but an installed wheel has no repository root: the wheel carries them as
``app/_migrations`` and ``app/_pass_templates``, and app.infra.config.shipped() finds them in
either place. Everything else is configured in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Root folder -> folder inside the ``app`` package of a built wheel.
SHIPPED = {"migrations": "_migrations", "pass_templates": "_pass_templates"}


class BuildPyWithShippedFolders(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout
        for source, inside in SHIPPED.items():
            target = Path(self.build_lib) / "app" / inside
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / source, target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithShippedFolders})
