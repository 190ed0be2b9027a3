"""What every stage shares: the config schema, the shard format, image checks, labels, seeds, logging, the CLI frame.
May import nothing of the project's other packages; every other package may import it."""
