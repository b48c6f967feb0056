import os
import sys

# tests/python holds shared helpers (reference models, oracle replay); make them importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
