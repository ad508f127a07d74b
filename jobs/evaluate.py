"""`python -m jobs.evaluate ...` (what `ray job submit` runs): the evaluation job, which lives in
:mod:`jobs.evaluation.job`."""

import sys

from jobs.evaluation.job import main

if __name__ == "__main__":
    sys.exit(main())
