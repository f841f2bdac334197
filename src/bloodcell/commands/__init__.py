"""The CLI's commands, one module per group; each has ``add_commands(sub)`` and imports no torch at the top,
so building the parser (and ``--help``) stays fast."""

MODULES = ("data", "models", "train", "evaluate", "calibrate", "predict", "ensemble", "export", "explain", "benchmark",
           "tune", "serve")
