"""decapflow: turn plain text into image captioners (DeCap, ICLR 2023)."""

__version__ = "0.1.0"
