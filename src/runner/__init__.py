"""runner: run language models that are too big for the machine in front of you."""

__version__ = "0.1.0"
