"""Exit statuses of every `python -m sonic` command; scripts and job schedulers rely on them."""

EXIT_OK = 0  # everything asked for was done
EXIT_FAILED = 1  # ran, but some jobs failed (batch, status)
EXIT_USAGE = 2  # bad invocation, bad input or a setup problem; the message says what to change
EXIT_CANCELLED = 130  # Ctrl-C or SIGTERM; what finished is kept (the same command resumes)
