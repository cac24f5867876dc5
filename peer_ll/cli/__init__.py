"""Jobs behind the `peer-ll` command: one module per subcommand."""
