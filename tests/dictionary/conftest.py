"""Lets the dictionary tests import their shared step (`from steps import adam_step`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
