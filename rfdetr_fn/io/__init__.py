"""The outside world: weights files (`weights`, `formats`, `adapt`), train-state checkpoints
(`checkpoint`), atomic writes, run directories and their lock, the run log and loggers, image files and
drawings, and the processes of a `torchrun` job (`distributed`)."""
