"""`python -m dtrain ...` runs the command line."""

from dtrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
