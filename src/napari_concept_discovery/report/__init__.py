"""The HTML report of a dictionary on a whole store."""
