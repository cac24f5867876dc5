"""``python -m peer_ll`` runs the ``peer-ll`` command."""

import sys

from peer_ll.cli import main

if __name__ == "__main__":
    sys.exit(main())
