"""``python -m deployments.cli`` is ``dicom-dispatch``."""

import sys

from deployments.cli import main

sys.exit(main())
