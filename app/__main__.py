import sys

from .cli import main

# Guarded: a spawned worker process (app/api/v2/json_worker.py) imports this module again as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
