"""Work of a training step through ``torch.compile``: a few fused kernels where eager mode issues
one per operator.

The OOD losses of a training step (the energy of the proposals and the outliers, the embedding
head, the center similarities, the Cluster Focal Loss, the outliers' repulsion) run 40 small
kernels forward and 68 backward, every step. Where the host issuing kernels is what limits
training (a small backbone, a fast GPU), their launches, not their arithmetic, are the cost.
``torch.compile`` (``MODEL.OOD.COMPILE_LOSSES``) traces the same Python functions once and fuses
their elementwise and reduction work into a few generated kernels, forward and backward; the
matrix products stay library calls.

Compiled with dynamic shapes: the number of foreground proposals changes every step, and one
compiled graph serves every count (torch compiles once more for a count of 1, and when the first
count happens to equal another size of the graph, such as the feature size). The model's
parameters are inputs of the graph, not constants: the optimizer's updates, a copy of the model
and a checkpoint load all reach it. A compilation that fails (no C++ compiler or Triton, a torch
without ``torch.compile``) turns the option off with a warning, and the losses are computed
eagerly, the same functions.
"""
import logging
from typing import Callable, Optional

import torch

from ..errors import one_line

logger = logging.getLogger(__name__)

#: ``torch.compile``'s backend (tests use ``"aot_eager"``: the same tracing, without code generation).
BACKEND = "inductor"


class CompiledFunction:
    """
    ``fn(*args)`` through ``torch.compile(fn, dynamic=True)``, compiled at the first call; ``fn``
    itself, eagerly, once a compilation failed (:attr:`error` says why).

    Args:
        fn: a function of tensors (and modules, whose parameters become inputs of the graph).
        name: what turned the compilation on (a config key), for the warning.
    """

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.error: Optional[str] = None
        self._compiled = None

    @property
    def failure(self) -> Optional[str]:
        """Why it computes eagerly ("torch.compile failed (...)"), or None while compiling works."""
        return f"torch.compile failed ({self.error})" if self.error else None

    def __getstate__(self):
        # Copies (copy.deepcopy of a model, pickling) compile again at their first call.
        return {**self.__dict__, "_compiled": None}

    def __call__(self, *args):
        if self.error is None:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=True, backend=BACKEND)
                return self._compiled(*args)
            except Exception as e:  # torch's compilers raise many kinds: training goes on, eagerly
                self.error, self._compiled = one_line(e, 300), None
                logger.warning("%s turned off, computing eagerly: %s", self.name, self.failure)
        return self.fn(*args)
