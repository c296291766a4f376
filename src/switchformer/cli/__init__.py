"""The command-line interface: parse arguments and call the library, nothing else."""
