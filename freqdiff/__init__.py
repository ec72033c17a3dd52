"""freqdiff core: processes, samplers, networks and metrics in plain torch (no Lightning import)."""

from freqdiff._torchvision_compat import install as _install_torchvision_hook

_install_torchvision_hook()
