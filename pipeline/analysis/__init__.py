"""Pure numpy/pandas analysis of stored activations: streaming statistics, neuron clusters and stability, layer separability and CKA, embeddings."""
