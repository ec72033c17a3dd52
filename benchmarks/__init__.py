"""Side-by-side ratio benchmarks (DESIGN.md §1): ``python -m benchmarks [FILTER ...]`` (``make bench``).

Each module here exposes ``main() -> None`` and prints its own table; it measures the variants it compares
interleaved in one process, so the ratio holds even where absolute speeds drift.
"""
