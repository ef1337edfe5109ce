"""Hungarian matching and the set criterion."""
