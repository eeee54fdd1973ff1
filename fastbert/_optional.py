"""Optional dependencies: one clear error naming the extra to install.

``pip install fastbert`` needs only torch (and numpy); the rest come with extras:
``[triton]`` (Triton kernels), ``[train]`` (tokenizers, tqdm, safetensors, matplotlib: pretraining,
fine-tuning, checkpoints), ``[hf]`` (transformers: ``fastbert.patch``, checkpoint conversion),
``[bench]`` (matplotlib, pytest-benchmark: ``fastbert bench``), ``[test]``, ``[all]``.
"""

import importlib

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, extra: str, feature: str):
    """``importlib.import_module(module)``, or :class:`MissingExtra` saying that ``feature`` needs
    it and how to install it (``pip install 'fastbert[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtra(
            f"{feature} needs the `{top}` package, which is not installed: "
            f"pip install 'fastbert[{extra}]' (or pip install {top})"
        ) from e
