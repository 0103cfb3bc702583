"""esr: steer language models with SAE latents and measure Endogenous Steering Resistance."""

from esr.errors import EsrError

__version__ = "0.1.0"
__all__ = ["EsrError", "__version__"]
