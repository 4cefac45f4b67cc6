import sys

from afloc_engine.cli import main

sys.exit(main())
