"""``python -m privatelora.cli``: the same as the ``privatelora`` command."""

import sys

from privatelora.cli.main import main

sys.exit(main())
