"""`python -m dpnet.bench`: see dpnet.bench."""

from . import main

main()
