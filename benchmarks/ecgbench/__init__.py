"""The ECGBench accuracy suite: run, score (the paper's rules and strict ones), compare, judge, report."""
