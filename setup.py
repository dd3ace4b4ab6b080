"""Packaging lives in pyproject.toml; this file only adds the lm-eval startup hook (a .pth file) to installs.

A ``.pth`` file must sit at the root of site-packages. ``build_py`` copies it next to the packages for normal
wheels, and, for editable installs (PEP 660), into the editable wheel's install directory, which setuptools packs
instead of the build directory.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "kvcache_plugins_lmeval.pth"
HERE = Path(__file__).resolve().parent


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        source = str(HERE / PTH)
        self.copy_file(source, str(Path(self.build_lib) / PTH), preserve_mode=0)
        if getattr(self, "editable_mode", False):
            install_lib = self.get_finalized_command("install").install_lib
            self.copy_file(source, str(Path(install_lib) / PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
