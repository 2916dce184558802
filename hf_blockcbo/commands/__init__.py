"""Command-line faces of the verbs, optimum-cli style: one class per command, heavy imports inside `run()`."""
