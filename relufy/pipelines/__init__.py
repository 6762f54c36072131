"""The Makefile pipelines' own pieces: reports that tie the steps' outputs together."""
