"""python -m livediffusion.plugins.virtualcam [SOURCE] [options]: same as livediffusion webcam."""

import sys

from livediffusion.daemon.cli import main

sys.exit(main(["webcam", *sys.argv[1:]]))
