"""Environment switches, read once."""

import os

DEBUG: bool = os.environ.get("UWE_DEBUG", "") not in ("", "0")
NO_PROGRESS: bool = os.environ.get("UWE_NO_PROGRESS", "") not in ("", "0")
