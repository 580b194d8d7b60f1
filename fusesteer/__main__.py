"""`python -m fusesteer ...`: the `fusesteer` command line (:mod:`fusesteer.cli`)."""

import sys

from .cli import main

sys.exit(main())
