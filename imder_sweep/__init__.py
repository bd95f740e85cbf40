"""imder_sweep: IMDer (NeurIPS 2023) as a configurable model and a Ray-distributed sweep platform."""

__version__ = "0.1.0"
