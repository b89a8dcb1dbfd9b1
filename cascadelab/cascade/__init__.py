"""Pure-torch cascade ranking: batches, models (DSSM, DIN, MLP), objectives and metrics."""
