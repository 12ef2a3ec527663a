"""`python3 -m chaos` (bench/ on PYTHONPATH): the chaos run; scripts/chaos runs it."""

import sys

from .main import main

sys.exit(main())
