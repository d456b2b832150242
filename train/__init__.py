"""Config loading, validation, migration, the training loop and the command line."""
