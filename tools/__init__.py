"""Developer tools run by the Makefile (not part of the package): the lock file writer and checker."""
