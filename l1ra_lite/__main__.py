import sys

from l1ra_lite.cli import main

sys.exit(main())
