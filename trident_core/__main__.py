"""`python -m trident_core ...`"""

from .cli import run

run()
