"""`python -m wsrunner` is the same as the `wsrunner` command."""

from __future__ import annotations

import sys

from wsrunner.cli import main

sys.exit(main())
