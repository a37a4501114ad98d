import sys

from flexgen.cli import main

sys.exit(main())
