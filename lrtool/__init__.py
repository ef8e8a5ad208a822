"""lrtool: recycle LoRA adapters (merge, route) and measure whether recycling works."""

__version__ = "0.1.0"
