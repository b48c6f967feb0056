import os
import sys

# Let tests import the pure-Python reference models as `reference.<name>`.
sys.path.insert(0, os.path.dirname(__file__))
