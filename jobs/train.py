"""`python -m jobs.train ...` (what `ray job submit` runs): the training job, which lives in
:mod:`jobs.training.job`."""

import sys

from jobs.training.job import main

if __name__ == "__main__":
    sys.exit(main())
