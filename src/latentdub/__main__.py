"""``python -m latentdub …`` runs the command line, the same as the ``latentdub`` script."""

from latentdub.cli import main

if __name__ == "__main__":
    main()
