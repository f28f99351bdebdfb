"""The command lines of ``tools/`` (each there is a two-line wrapper of a ``main`` here).

Each module is also runnable as ``python -m ood_det.cli.<name>``.
"""
