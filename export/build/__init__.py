"""`pulse-edge export`: orchestration from a checkpoint to a validated bundle."""
