"""The ONNX graph vocabulary every family and pipeline builds from: GraphBuilder, the building
blocks, weights shared between graphs, attention shape checks."""
