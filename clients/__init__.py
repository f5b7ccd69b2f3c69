"""Python clients of a vqtok server (`client`: sync and async), the in-process backend with the same methods
(`local`), and dataset tokenization (`tokenize`). Import the public names from `vqtok`; nothing is imported
here, so the command line (which imports `clients.tokenize.commands`) pays for neither httpx nor numpy."""
