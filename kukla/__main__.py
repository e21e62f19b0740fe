"""`python -m kukla` is the CLI; torchrun launches it this way too."""

from kukla.cli.app import main

main()
