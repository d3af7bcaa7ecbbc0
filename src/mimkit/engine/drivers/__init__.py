"""Commands that drive several tasks or read their results: `mimkit compare` (and its report) and `mimkit
visualize`."""
