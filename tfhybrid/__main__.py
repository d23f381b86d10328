"""`python -m tfhybrid export|report MODEL` (see `tfhybrid.cli`)."""

from tfhybrid.cli import main

main()
