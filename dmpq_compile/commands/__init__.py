"""One module per ``dmpq-compile`` subcommand (see ``dmpq_compile/cli.py``)."""
