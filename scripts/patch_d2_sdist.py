"""Prepare the pb1-detectron2 0.6 sdist for a pure-Python install as ``detectron2``.

Used by ``scripts/setup_env.sh`` only. The sdist ships detectron2 v0.6's Python
sources without ``detectron2/layers/csrc``; its setup.py would still try to
build the C++ extension and installs under another distribution name. This
rewrites three things in its setup.py: the name (so ``pip show detectron2``
finds it), the extension list (empty), and the ``black==21.4b2`` pin (a
formatter used only to pretty-print lazy configs, which does not install on
current Python).
"""
import sys
from pathlib import Path

REPLACEMENTS = [
    ('name="pb1-detectron2"', 'name="detectron2"'),
    ("ext_modules=get_extensions(),", "ext_modules=[],"),
    ('"black==21.4b2",', ""),
]


def main(src_dir: str) -> None:
    setup_py = Path(src_dir) / "setup.py"
    text = setup_py.read_text()
    for old, new in REPLACEMENTS:
        if old not in text:
            sys.exit(f"patch_d2_sdist: {setup_py} has no {old!r}; is it pb1-detectron2 0.6?")
        text = text.replace(old, new)
    setup_py.write_text(text)
    # Egg-info left in the sdist still names pb1-detectron2; let setuptools regenerate it.
    for stale in Path(src_dir).glob("*.egg-info"):
        for f in stale.iterdir():
            f.unlink()
        stale.rmdir()


if __name__ == "__main__":
    main(sys.argv[1])
