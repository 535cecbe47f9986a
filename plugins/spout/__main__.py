"""python -m livediffusion.plugins.spout --from SENDER [options]: same as livediffusion spout."""

import sys

from livediffusion.daemon.cli import main

sys.exit(main(["spout", *sys.argv[1:]]))
