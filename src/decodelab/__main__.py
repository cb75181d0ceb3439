"""``python -m decodelab``: the same command line as the ``decodelab`` console script."""

from decodelab.cli import main

if __name__ == "__main__":
    main()
