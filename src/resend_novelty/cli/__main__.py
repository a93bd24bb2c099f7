"""``python -m resend_novelty.cli`` (and ``torchrun -m resend_novelty.cli``) runs ``resend``."""

import sys

from .main import main

sys.exit(main())
