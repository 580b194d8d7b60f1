"""`python -m bench.serve ...` in a source checkout: an alias of `python -m fusesteer.bench.serve ...`."""

import sys

from fusesteer.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
