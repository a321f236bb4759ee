"""Sparse autoencoders: one in-memory layout (:class:`Sae`), loaders for the formats people bring,
and a monitor that watches a few chosen features at the cost of a d x k product per token."""

from guard.sae.formats import load_sae, save_saelens
from guard.sae.model import Sae, layer_for_hook

__all__ = ["Sae", "layer_for_hook", "load_sae", "save_saelens"]
