"""``python -m peer_ll.cli`` (what ``torchrun -m peer_ll.cli run ...`` starts)."""

import sys

from peer_ll.cli import main

if __name__ == "__main__":
    sys.exit(main())
