"""Deep Compression after pruning, for either Keras: weight sharing (`kmeans`), gap and
Huffman coding, the compressed file, bytes per stage, and the sparse SavedModel format
(`serving`)."""
