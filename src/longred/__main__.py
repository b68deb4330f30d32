import sys

from longred.cli import main

sys.exit(main())
