"""imder_sweep: IMDer (NeurIPS 2023) as configurable code and a Ray-distributed sweep platform."""

__version__ = "0.1.0"
