"""The coupon command line: `python starter.py --help`."""

import sys

from coupons.cli import main

if __name__ == "__main__":
    sys.exit(main())
