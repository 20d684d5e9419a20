"""Core vocabulary shared by every stage: configs, quantizers, the model graph, the compensated-model state."""
