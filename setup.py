"""Installs the start-up hook beside the package: moe_compress.pth and its PEP 829 twin moe_compress.start go to the
root of site-packages, in regular and in editable installs (moe_compress/autoload.py says what they do)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK_FILES = [Path("src") / "moe_compress.pth", Path("src") / "moe_compress.start"]


class BuildPyWithHook(build_py):
    def run(self) -> None:
        super().run()
        for path in HOOK_FILES:
            self.copy_file(str(path), str(Path(self.build_lib) / path.name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / p.name) for p in HOOK_FILES]


class EditableWheelWithHook(editable_wheel):
    # the editable wheel holds no build_lib files at its root; this step is where setuptools puts its own .pth files
    def _install_namespaces(self, installation_dir, pth_prefix) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        for path in HOOK_FILES:
            shutil.copy(path, Path(installation_dir) / path.name)


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
