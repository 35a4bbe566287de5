"""DINO pretraining of HIPT's encoders: one engine, two data sources (``hipt pretrain``)."""
