"""`python -m tune.sweep`, kept for scripts that call it: the program is `ray_jobs.sweep` (a top-level
package named `tune` read like `ray.tune`; the sweep program now sits with the other Ray programs)."""

import sys

from ray_jobs.sweep import main

if __name__ == "__main__":
    sys.exit(main())
