"""Side-by-side ratio benchmarks: ``python -m benchmarks [FILTER ...]`` (``make bench``).

See docs/architecture.md, "Tests and benchmarks".

Each module here exposes ``main() -> None`` and prints its own table; it measures the variants it compares
interleaved in one process, so the ratio holds even where absolute speeds drift.
"""
