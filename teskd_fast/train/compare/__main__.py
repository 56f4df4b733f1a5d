"""``python -m teskd_fast.train.compare``: the ``teskd-compare`` command."""

import sys

from teskd_fast.train.compare import main

sys.exit(main())
