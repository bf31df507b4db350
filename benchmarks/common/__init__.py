"""What every benchmark shares: machine description, measurement helpers, roofline, tables, progress."""
