"""autoseg: self-configuring medical image segmentation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autoseg")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
