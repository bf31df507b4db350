"""The command line: every `pulse-edge` command, each thin over the library."""
