"""hipt stage: preprocessing."""
