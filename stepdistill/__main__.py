"""`python -m stepdistill ...`: the same command line as `stepdistill ...`."""
import sys

from stepdistill.cli import main

sys.exit(main())
