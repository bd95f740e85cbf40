"""The sweep layer: search-space files, the plan, the Ray Tune + Train driver, the tables.

Only this layer (and tracking) imports Ray; `imder_sweep.train` runs without it.
"""

from imder_sweep.sweep.plan import Plan, describe, make_plan
from imder_sweep.sweep.space import Space, Study, resolve_space_path
from imder_sweep.sweep.validation import load_space

__all__ = ["Plan", "Space", "Study", "describe", "load_space", "make_plan", "resolve_space_path"]
