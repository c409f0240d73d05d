"""``python -m reproduce.judge``: the judge's commands (= ``python -m reproduce evaluate``)."""

from reproduce.judge.cli import main

if __name__ == "__main__":
    main()
