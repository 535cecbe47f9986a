"""livediffusion.daemon: the streaming engine process (everything that needs torch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("livediffusion")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"
