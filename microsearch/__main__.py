import sys

from microsearch.cli import main

sys.exit(main())
