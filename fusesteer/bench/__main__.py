"""`python -m fusesteer.bench {parity,latency,all,aot,gpu} [--quick] [--out DIR] ...` (same as `fusesteer bench`)."""

import sys

from . import main

sys.exit(main())
