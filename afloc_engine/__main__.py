import sys

from afloc_engine.cli import console_main

sys.exit(console_main())
