"""``curvops report``: a self-contained HTML curvature report of a model (figures + summary.json).

* :func:`build_report` — measure a model and write the report directory; returns the summary.
* :func:`render_html` — the page for a summary dict (every number on it comes from the summary).
* :func:`load_problem` — load and check a user's model factory, checkpoint and data loader.
"""

from .build import SECTIONS, Budgets, build_report, to_jsonable
from .html import render_html, write_html
from .loading import Problem, SpecError, load_problem

__all__ = ["build_report", "render_html", "write_html", "load_problem", "Problem", "SpecError", "Budgets",
           "SECTIONS", "to_jsonable"]
