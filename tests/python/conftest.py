import os
import sys

# Make `reference` (tests/python/reference) importable from every test module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
