"""Tools for testing gradients: ``gradcheck`` (NumPy only) and Hypothesis strategies.

``graphlora.testing.strategies`` needs Hypothesis (``pip install 'graphlora[test]'``) and is
imported on its own; ``gradcheck`` needs nothing beyond graphlora.
"""

from __future__ import annotations

from graphlora.errors import GradcheckError
from graphlora.testing.gradcheck import gradcheck

__all__ = ["GradcheckError", "gradcheck"]
