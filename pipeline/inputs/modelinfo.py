"""What the pipeline needs to know about a model, whatever format it was loaded from."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerInfo:
    """One addressable layer.

    Attributes
    ----------
    name : str
        Address of the layer; nested sub-model layers are ``outer/inner``.
    type : str
        Class name (``Conv2D``) or, for graph models, the main op type.
    output_shape : tuple
        Output shape without the batch axis (``None`` for unknown sizes).
    analysable : bool
        True when the output is a feature map ``(H, W, C)`` or a vector ``(C,)`` of floats.
    reason : str
        Why it is not analysable (empty when it is).
    """

    name: str
    type: str
    output_shape: tuple
    analysable: bool
    reason: str = ""


def analysable_shape(shape) -> tuple[bool, str]:
    """Whether a per-example output shape can be reduced to one value per channel.

    Parameters
    ----------
    shape : tuple
        Output shape without the batch axis.

    Returns
    -------
    (bool, str)
        The verdict and, when False, the reason.
    """
    if shape is None:
        return False, "unknown output shape"
    if len(shape) not in (1, 3):
        return False, f"output rank {len(shape) + 1} (need a (H, W, C) map or a (C,) vector)"
    if shape[-1] is None:
        return False, "unknown number of channels"
    return True, ""
