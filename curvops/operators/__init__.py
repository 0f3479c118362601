"""Lazy operators: the protocol, the algebra, helpers and the curvature matrices."""

from .activation import ActivationHessian
from .covariance import GradientCovariance
from .gradient_factor import GradientFactor
from .blocks import CrossHessian, submatrix
from .output_hessian import HessianResidual, OutputHessian
from .algebra import as_operator, block_diag, func_operator, restrict, tag
from .base import Operator, ParamLayout
from .checks import DeterminismReport, check_deterministic
from .dense import Dense, Diagonal, Identity, LowRank
from .fisher import EmpiricalFisher, Fisher
from .ggn import GGN
from .hessian import Hessian
from .jacobian import Jacobian
from .kfac import EKFAC, KFAC
from .ntk import NTK
from .mixed import MixedDerivative, ParameterHessian
from .tags import PSD, SYMMETRIC

__all__ = [
    "Operator", "ParamLayout", "as_operator", "block_diag", "func_operator", "restrict", "tag",
    "Dense", "Diagonal", "Identity", "LowRank", "Hessian", "GGN", "Fisher", "EmpiricalFisher",
    "Jacobian", "NTK", "GradientCovariance", "GradientFactor", "ActivationHessian", "OutputHessian", "HessianResidual", "CrossHessian", "submatrix", "check_deterministic", "DeterminismReport", "PSD", "SYMMETRIC",
    "MixedDerivative", "ParameterHessian", "KFAC", "EKFAC",
]
