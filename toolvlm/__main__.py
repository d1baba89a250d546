"""`python -m toolvlm` runs the command line."""

import sys

from toolvlm.cli import main

sys.exit(main())
