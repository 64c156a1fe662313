"""What the chat screen delegates that is not drawn: loading a model, writing a reply."""
