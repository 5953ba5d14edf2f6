"""Losses of the propagation network: they live in :mod:`napari_propseg.losses` (online
adaptation and the reference losses use them too, and inference imports nothing from
training); the names stay importable from here."""
from ..losses import (CE_THRESHOLD, bootstrapped_ce, lovasz_grad, lovasz_hinge, lovasz_softmax,  # noqa: F401
                      lovasz_softmax_flat, propagation_loss)

__all__ = ["CE_THRESHOLD", "bootstrapped_ce", "lovasz_grad", "lovasz_hinge", "lovasz_softmax", "lovasz_softmax_flat",
           "propagation_loss"]
