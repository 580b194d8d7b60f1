"""`python -m bench ...` in a source checkout: an alias of `python -m fusesteer.bench ...` (`fusesteer bench ...`)."""

import sys

from fusesteer.bench.runner import main

sys.exit(main(prog="python -m bench"))
