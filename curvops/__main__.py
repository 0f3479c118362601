"""``python -m curvops …``: the command-line interface (see :mod:`curvops.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
