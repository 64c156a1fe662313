"""The Textual chat app (`runner chat`). No torch or mlx here: models load through `runner.backend`."""
