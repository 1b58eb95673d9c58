"""What every framework integration shares: per-rank variants and their write-back, where the
weights come from (sidecar or store), finding the sidecar from a model path, moving bytes to the
GPU, and the copy beside the model build. A framework's own package is an adapter on these."""
