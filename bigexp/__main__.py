import sys

from bigexp.cli import main

sys.exit(main())
