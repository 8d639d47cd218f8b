"""Files: models in and out (external data, all or none), .npz data, datasets, sparse storage."""
