"""Submit dino_sparo training or evaluation through submitit; see ``--help`` (same as ``dino-sparo-submit``)."""

import sys

from dino_sparo.cli.submit import main

if __name__ == "__main__":
    sys.exit(main())
