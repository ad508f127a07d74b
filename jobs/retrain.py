"""`python -m jobs.retrain ...` (what `ray job submit` runs): the retraining job, which lives in
:mod:`jobs.retraining.job`."""

import sys

from jobs.retraining.job import main

if __name__ == "__main__":
    sys.exit(main())
