"""torchvision next to a CPU-only torch: the one place this is handled (see docs/platform.md).

PyPI's torchvision wheel (pulled in by torch-fidelity, hence by torchmetrics and Lightning) is a
CUDA build. Next to the CPU torch its C++ extension fails to load, and ``import torchvision`` then
raises ``RuntimeError: operator torchvision::nms does not exist`` from its fake-op registrations,
which breaks ``import lightning``.

The fix declares the two operator schemas (``torchvision::nms``, ``torchvision::qnms``) through
``torch.library`` right before torchvision is first imported. torchvision's own C++ ops stay
unavailable (nothing here uses them: FID only needs the Inception network).

How it is applied, lazily and only when needed:
- :func:`install` puts a tiny import hook on ``sys.meta_path``; it imports nothing itself.
  ``import freqdiff`` calls it, so every package of this project is covered.
- ``make install`` also writes ``freqdiff_torchvision_compat.pth`` into the venv's site-packages
  (``python -m freqdiff._torchvision_compat --write-pth``), so *every* interpreter of the venv,
  DDP child processes and ``python -c "import lightning"`` included, gets the hook at start-up.
- When torchvision is imported, the hook runs :func:`patch` once and steps aside. ``patch`` is a
  no-op on a CUDA torch, and wherever torchvision's extension loads (its ops then exist).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_LIB = None  # keeps the torch.library.Library alive (schemas vanish when it is collected)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def patch() -> bool:
    """Declare torchvision's missing op schemas if its C++ extension cannot load. Returns True if it did."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return False
    import torch

    if torch.version.cuda is not None:  # CUDA torch: torchvision's own extension works
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    folder = os.path.dirname(spec.origin)
    lib_path = next((os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("_C.")), None)
    if lib_path is not None:
        try:
            torch.ops.load_library(lib_path)  # what torchvision itself does first
            return False  # a CPU torchvision: ops exist, nothing to do
        except (OSError, RuntimeError):
            pass
    _LIB = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _LIB.define(schema)
    return True


class _Hook(importlib.abc.MetaPathFinder):
    """Runs :func:`patch` the first time ``torchvision`` is imported, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]
            patch()
        return None  # let the normal finders import it


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _Hook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Hook())


PTH_NAME = "freqdiff_torchvision_compat.pth"


def write_pth() -> str:
    """Write the start-up hook into this interpreter's site-packages; returns its path."""
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write("import freqdiff._torchvision_compat as _fd_tv; _fd_tv.install()\n")
    return path


if __name__ == "__main__":
    if "--write-pth" in sys.argv:
        print(write_pth())
