"""Run every benchmark module in this package: ``python -m benchmarks [NAME_FILTER ...]``.

A module runs when its name contains any of the filters (all run without a filter); modules whose
names start with ``_`` are skipped. Each module exposes ``main() -> None``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import freqdiff  # noqa: F401  (installs the torchvision-on-CPU-torch hook before anything else)


def discover(filters: list[str]) -> list[str]:
    """Names of the benchmark modules matching any filter (all if none), sorted."""
    package = sys.modules[__package__ or "benchmarks"]
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    return [n for n in names if not filters or any(f in n for f in filters)]


def main(argv: list[str] | None = None) -> int:
    filters = list(sys.argv[1:] if argv is None else argv)
    names = discover(filters)
    if not names:
        print(f"no benchmark matches {filters}; available: {discover([])}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== benchmarks.{name}", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"{__package__ or 'benchmarks'}.{name}").main()
        print(f"== benchmarks.{name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
