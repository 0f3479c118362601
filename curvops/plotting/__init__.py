"""Figures from curvops results (matplotlib; ``pyplot`` is imported only when a figure is created).

Every function takes plain tensors/arrays (or the library's result objects where noted), draws on
``ax`` (a new figure when None), saves to ``save`` (a path; parent folders created, 120 dpi) and
returns the Axes.  Nothing calls ``plt.show()``, changes ``rcParams`` or closes a figure.
"""

from .architecture import architecture_table, forward_formula, plot_architecture
from .landscape import direction_label, plot_landscape_1d, plot_landscape_2d
from .matrices import plot_eigenvector_heatmap, plot_heatmap, plot_layer_sensitivity
from .spectra import plot_density, plot_eigenvalue_decay, plot_eigenvalues, plot_spectrum_evolution

__all__ = [
    "plot_eigenvalues", "plot_density", "plot_eigenvalue_decay", "plot_spectrum_evolution",
    "plot_heatmap", "plot_eigenvector_heatmap", "plot_layer_sensitivity",
    "plot_landscape_1d", "plot_landscape_2d", "direction_label",
    "plot_architecture", "architecture_table", "forward_formula",
]
