"""``python -m demo --model tiny``: serve the multimodal chat page."""

import sys

from .serve import main

sys.exit(main())
