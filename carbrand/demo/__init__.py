"""The demo (`carbrand demo`): `synthetic` draws a small stand-in dataset of made-up brands,
and `command` runs the whole story on it: generate, prepare, train, evaluate, predict."""
