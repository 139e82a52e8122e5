"""Package discovery (metadata lives in pyproject.toml): the folder ``compiler/`` is the
package ``onnxpress``, ``passes/`` is ``onnxpress.passes`` and ``runtime_ops/`` is
``onnxpress.runtime_ops``; setuptools finds the subpackages of each."""

from setuptools import find_packages, setup

ROOTS = {"onnxpress": "compiler", "onnxpress.passes": "passes", "onnxpress.runtime_ops": "runtime_ops"}

setup(
    package_dir=ROOTS,
    packages=[f"{name}{'.' + sub if sub else ''}" for name, folder in ROOTS.items()
              for sub in ["", *find_packages(folder)]],
)
