"""``python -m teskd_fast.train`` (and ``torchrun ... -m teskd_fast.train``): the ``teskd-train`` command."""

import sys

from teskd_fast.train.cli import main

sys.exit(main())
