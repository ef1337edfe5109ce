"""Research on parameter trees: vmapped ensembles and per-example gradients (`ensemble`), and weight
averaging (`soup`)."""
