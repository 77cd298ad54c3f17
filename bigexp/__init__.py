"""bigexp: exponential learning rates (Li & Arora, ICLR 2020) at scale."""
__version__ = "0.1.0"
