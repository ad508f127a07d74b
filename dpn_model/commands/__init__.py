"""`dpn` subcommands that need only the model package (no Ray): info, convert."""
