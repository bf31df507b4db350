"""Speed benchmarks behind `pulse-edge bench`: latency, backends, recipes, the fused projector."""
