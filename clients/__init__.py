"""Python clients (sync and async), dataset tokenization and the `vqtok` command line."""
