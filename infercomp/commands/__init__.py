"""One module per subcommand; each parses options, builds a config, runs the pipeline, renders."""
