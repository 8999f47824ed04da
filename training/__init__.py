"""Training tools: run from the repository root, never imported at run time by janus, pipeline or jobs."""
