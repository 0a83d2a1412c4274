"""`fusion-export`: the command-line shell (parse, exit codes, signals) and its commands."""
