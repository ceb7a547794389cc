"""Tools for testing gradients: ``gradcheck``, ``check_vjp``, Jacobians, Hypothesis strategies.

``graphlora.testing.strategies`` needs Hypothesis (``pip install 'graphlora[test]'``) and is
imported on its own; ``gradcheck`` needs nothing beyond graphlora.
"""

from __future__ import annotations

from graphlora.errors import GradcheckError
from graphlora.testing.gradcheck import check_vjp, gradcheck, jacobian, numeric_jacobian

__all__ = ["GradcheckError", "check_vjp", "gradcheck", "jacobian", "numeric_jacobian"]
