"""``python -m dfmpc_deploy.report [--check]``: regenerate (or check) report.schema.json from the dataclasses."""
import sys

from .schema import main

sys.exit(main())
