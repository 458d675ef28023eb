"""`python -m qforge`: the command line (what torchrun runs for `qforge train --nproc N`)."""
import sys

from .cli import main

sys.exit(main())
