"""``python -m robust_jem``: the robust-jem command line (:mod:`suite.cli`)."""

from suite.cli import main

if __name__ == "__main__":
    main()
