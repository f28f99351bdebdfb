"""Print the versions that matter: ``python -m ood_det.env_info [--short]``."""
import sys


def describe() -> dict:
    import numpy
    import PIL
    import torch
    import torchvision

    from ood_det.compat import has_compiled_ops

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "Pillow": PIL.__version__,
    }
    try:
        import detectron2

        info["detectron2"] = detectron2.__version__
        info["detectron2 compiled ops"] = "yes" if has_compiled_ops() else "no (pure Python)"
    except ImportError:
        info["detectron2"] = "not installed"
    return info


def short(info=None) -> str:
    """:func:`describe` on one line."""
    return ", ".join(f"{k} {v}" for k, v in (describe() if info is None else info).items())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    info = describe()
    if "--short" in argv:
        print(short(info))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
