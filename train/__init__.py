"""hipt stage: train."""
