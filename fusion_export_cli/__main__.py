"""`python -m fusion_export_cli`."""

from .cli import exit_as_main, main

exit_as_main(main())
