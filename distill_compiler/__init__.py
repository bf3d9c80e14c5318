"""distill-compiler: compile a YAML task spec into a small student model and an edge bundle.

The public API is `load_spec`, `plan` and `build`. This module imports nothing heavy: torch,
transformers, litellm and onnxruntime load only inside the stages that need them.
"""

from __future__ import annotations

import os

# litellm fetches its model-price map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"

from .pipeline import Project, build, plan  # noqa: E402  (after the environment is set)
from .spec import Spec, load_spec  # noqa: E402

__all__ = ["Project", "Spec", "__version__", "build", "load_spec", "plan"]
