import sys

from stepdistill.cli import main

sys.exit(main())
