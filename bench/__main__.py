"""`python -m bench {parity,latency,all} [--quick] [--model M] [--out DIR] [--device cpu|cuda]`."""

import sys

from . import main

sys.exit(main())
