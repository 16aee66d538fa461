"""poolbench: benchmark and compare pooling operators in CNNs."""

__version__ = "0.1.0"
