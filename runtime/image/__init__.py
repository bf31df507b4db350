"""Image preprocessing (anyres tiles) and the merge of the vision graph's features."""
