"""``python -m medflow``: the ``medflow`` command."""

from medflow.flows.entry import main

main()
