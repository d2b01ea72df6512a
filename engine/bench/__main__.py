"""`python -m engine.bench`: see engine/bench/__init__.py."""

import sys

from .cli import main

sys.exit(main())
