"""Pure tensor operators: no module state, no imports from the rest of the package."""

from .sinkhorn import Impl, dustbin_marginals, dustbin_sinkhorn, log_sinkhorn

__all__ = ["Impl", "dustbin_marginals", "dustbin_sinkhorn", "log_sinkhorn"]
