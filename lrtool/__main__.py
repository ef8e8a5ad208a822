"""`python -m lrtool` runs the command-line tool."""

from lrtool.cli import main

if __name__ == "__main__":
    main()
